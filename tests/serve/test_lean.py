"""The lean Llama decode step (`serve/lean.py`) against the model's own forward: equal logits."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_tiny_gpt2
from lorakit import LoraConfig, get_peft_model
from lorakit.lora.rows import BASE
from lorakit.serve.lean import LlamaDecode
from lorakit.serve.registry import ModelHost
from serve_support import make_model

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMALL = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def _mistral(window: int | None):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(**SMALL, sliding_window=window)).eval()


def _qwen2():
    """Qwen2 with q/k/v biases, its last two layers on a 3-token sliding window."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=3, max_window_layers=1)
    assert config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).eval()


FAMILIES = {
    "llama": make_model,
    "mistral": lambda: _mistral(None),
    "mistral-window": lambda: _mistral(3),
    "qwen2-bias-window": _qwen2,
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(model maker, adapter dirs): two random adapters on all 7 projections."""
    make = FAMILIES[request.param]
    root = tmp_path_factory.mktemp("lean")
    for seed, name in enumerate(["a", "b"], start=1):
        torch.manual_seed(seed)
        model = get_peft_model(
            make(), LoraConfig(r=4, lora_alpha=8, target_modules=ALL, init_lora_weights=False)
        )
        model.save_pretrained(root / name)
    return make, {name: root / name for name in ["a", "b"]}


def _host(make, adapters: dict, lean: bool) -> ModelHost:
    host = ModelHost(make(), "base")
    host.lean = lean
    for name, path in adapters.items():
        host.load(name, path)
    return host


@pytest.mark.parametrize("lengths", [[5, 3, 4], [4, 4, 4]], ids=["padded", "same-length"])
def test_lean_steps_equal_the_forward_bit_for_bit(family, lengths):
    """Three decode steps over mixed adapters (packed, fused groups learned on the first step,
    prepacked bases): the lean step's logits and KV cache equal the model's own forward's, for
    Llama, Mistral with and without a sliding window, and Qwen2 with biases and sliding layers
    (the prompts are longer than the 3-token windows)."""
    from transformers import DynamicCache

    make, adapters = family
    hosts = {"lean": _host(make, adapters, True), "forward": _host(make, adapters, False)}
    assert hosts["lean"].lean_decode is not None and hosts["forward"].lean_decode is None
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.arange(3 + row, 3 + row + n)
        mask[row, width - n :] = 1
    rows = ["a", "b", BASE]
    caches, logits = {}, {}
    with torch.inference_mode():
        for name, host in hosts.items():
            with host.rows(rows):
                out = host.forward_model(
                    input_ids=ids, attention_mask=mask, use_cache=True, cache=DynamicCache()
                )
            caches[name], logits[name] = out.cache, out.logits[:, -1:]
        positions = mask.sum(1, keepdim=True) - 1
        for _ in range(3):
            token = logits["lean"][:, -1].argmax(-1, keepdim=True)
            positions = positions + 1
            mask = torch.cat([mask, torch.ones(len(lengths), 1, dtype=mask.dtype)], 1)
            for name, host in hosts.items():
                with host.lock, host.decode(rows):
                    if name == "lean":
                        logits[name] = host.lean_decode(token, positions, mask, caches[name])
                    else:
                        logits[name] = host.forward_model(
                            input_ids=token,
                            position_ids=positions,
                            attention_mask=mask,
                            cache=caches[name],
                            use_cache=True,
                        ).logits
            assert torch.equal(logits["lean"], logits["forward"])
        for mine, theirs in zip(caches["lean"].layers, caches["forward"].layers, strict=True):
            assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
    assert hosts["lean"]._fused is not None and hosts["lean"]._fused.nbytes > 0  # groups ran


def test_lean_applies_to_plain_llama_only():
    model = make_model()
    assert LlamaDecode.for_model(model) is not None
    assert LlamaDecode.for_model(make_tiny_gpt2()) is None
    hooked = copy.deepcopy(model)
    hooked.model.layers[1].mlp.register_forward_hook(lambda *args: None)
    assert LlamaDecode.for_model(hooked) is None  # a hook would be skipped
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    assert LlamaDecode.for_model(eager) is None
