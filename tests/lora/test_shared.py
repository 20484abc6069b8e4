"""Layers reading one tensor share one dropout mask on it (lorakit.lora.shared)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import make_tiny_llama
from lorakit import LoraConfig, LoraLinear, get_peft_model
from lorakit.lora import shared

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def identity_lora(width: int, p: float) -> LoraLinear:
    """A LoRA layer whose delta is dropout(x) itself: A = B = I, scaling 1, base output 0."""
    base = nn.Linear(width, width, bias=False)
    nn.init.zeros_(base.weight)
    layer = LoraLinear(base)
    layer.update_layer("default", r=width, lora_alpha=width, lora_dropout=p)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.eye(width))
        layer.lora_B["default"].weight.copy_(torch.eye(width))
    layer.set_adapter("default")
    return layer.train()


def test_layers_reading_one_tensor_share_one_mask_and_a_new_forward_draws_another():
    q, k, v = (identity_lora(64, 0.5) for _ in range(3))
    x = torch.randn(4, 64) + 5  # never 0, so a zero means "dropped"
    first = [layer(x) for layer in (q, k, v)]
    # each output is dropout(x): zeros where dropped, x / (1 - p) elsewhere
    kept = first[0] != 0
    assert torch.allclose(first[0][kept], (x * 2)[kept])
    assert 0.3 < kept.float().mean() < 0.7
    assert torch.equal(first[1], first[0]) and torch.equal(first[2], first[0])  # one mask
    again = q(x)  # q twice on one tensor: a new forward, a new mask
    assert not torch.equal(again != 0, kept)
    shared.clear()
    other = k(x.clone())  # another tensor: its own mask
    assert not torch.equal(other != 0, kept)


def test_different_rates_do_not_share_a_mask():
    q, k = identity_lora(64, 0.5), identity_lora(64, 0.1)
    x = torch.randn(4, 64) + 5
    assert (q(x) == 0).float().mean() > 0.3 and (k(x) == 0).float().mean() < 0.25
    shared.clear()


def test_a_llama_block_draws_one_mask_per_distinct_input(monkeypatch):
    # q, k, v read one tensor, gate and up another; o and down their own: 4 masks a block, where
    # a mask per layer would be 7
    model = get_peft_model(
        make_tiny_llama(layers=2), LoraConfig(r=4, target_modules=ALL, lora_dropout=0.1)
    )
    draws = []
    keep_mask = shared.keep_mask
    monkeypatch.setattr(shared, "keep_mask", lambda *a: draws.append(a) or keep_mask(*a))
    model.train()
    model(input_ids=torch.randint(0, 128, (2, 9)))
    assert len(draws) == 4 * 2
    model.eval()
    model(input_ids=torch.randint(0, 128, (2, 9)))
    assert len(draws) == 8  # no dropout in eval mode


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_training_with_dropout_matches_the_plain_run(reentrant):
    # Checkpointing re-runs each block's forward inside backward: it must draw the original
    # forward's shared masks, so the gradients equal the plain run's.
    def run(checkpoint: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        base = make_tiny_llama()
        model = get_peft_model(
            base, LoraConfig(r=4, target_modules=ALL, lora_dropout=0.3, init_lora_weights=False)
        )
        if checkpoint:
            base.gradient_checkpointing_enable({"use_reentrant": reentrant})
            base.enable_input_require_grads()
        model.train()
        ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
        grads = {}
        for step in range(2):
            torch.manual_seed(10 + step)
            model.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return grads

    plain, checkpointed = run(False), run(True)
    for name, grad in plain.items():
        assert torch.allclose(checkpointed[name], grad, atol=1e-6), name


def test_keep_mask_keeps_each_element_with_probability_one_minus_rate():
    torch.manual_seed(0)
    n = 2_000_000
    for rate in (0.05, 0.5):
        kept = shared.keep_mask((n,), rate).double().mean().item()
        # binomial standard deviation sqrt(p(1-p)/n) is at most 3.5e-4 here: 5 sigma
        assert abs(kept - (1 - rate)) < 5 * (rate * (1 - rate) / n) ** 0.5
    # neighbouring elements (the two halves of one 64-bit draw) are independent
    keep = shared.keep_mask((n,), 0.5).view(-1, 2).double()
    both = (keep[:, 0] * keep[:, 1]).mean().item()
    assert abs(both - 0.25) < 5 * (0.25 * 0.75 / (n // 2)) ** 0.5
    # the same seed draws the same mask; odd sizes and shapes work
    torch.manual_seed(3)
    first = shared.keep_mask((3, 5, 7), 0.1)
    torch.manual_seed(3)
    assert first.shape == (3, 5, 7) and torch.equal(shared.keep_mask((3, 5, 7), 0.1), first)
    assert shared.keep_mask((4,), 0.0).all() and not shared.keep_mask((64,), 1 - 2**-33).any()


def test_a_large_mask_drawn_in_two_halves_follows_from_the_default_generator():
    n = 4 * shared._SPLIT_WORDS + 6  # two halves, drawn on two threads
    torch.manual_seed(5)
    first = shared.keep_mask((n,), 0.5)
    after = torch.rand(1)
    torch.manual_seed(5)
    assert torch.equal(shared.keep_mask((n,), 0.5), first) and torch.equal(torch.rand(1), after)
    assert not torch.equal(shared.keep_mask((n,), 0.5), first)  # the stream moved on
    half = first[: n // 2].double()
    second = first[n // 2 : n // 2 * 2].double()
    # each half keeps half its elements, and the halves are independent of each other
    sigma = (0.25 / (n // 2)) ** 0.5
    assert abs(half.mean().item() - 0.5) < 5 * sigma and abs(second.mean().item() - 0.5) < 5 * sigma
    assert abs((half * second).mean().item() - 0.25) < 5 * (0.1875 / (n // 2)) ** 0.5


def test_dropout_gradient_is_the_mask_scaled():
    layer = identity_lora(16, 0.25)
    x = (torch.randn(8, 16) + 5).requires_grad_(True)
    out = layer(x)
    kept = out != 0
    out.sum().backward()
    # d out / d x = 1 / (1 - p) where kept, 0 where dropped
    assert torch.equal(x.grad, kept.float() / 0.75)
    assert torch.allclose(out, x.detach() * kept / 0.75)
    shared.clear()
