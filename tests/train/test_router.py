"""The MoE router load-balancing loss in lorakit's loss: transformers' own `loss` as the oracle."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tiny_llama
from lorakit import LoraConfig, get_peft_model
from lorakit.errors import ConfigError
from lorakit.train import TrainConfig, train
from lorakit.train.evaluate import eval_loss
from lorakit.train.router import RouterLoss, balance_loss, micro_batch_loss
from moe_support import make_tiny_moe


def _batch(rows: int = 2, length: int = 10, pad: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0  # left padding on the first row
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe"])
@pytest.mark.parametrize("pad", [0, 3])
def test_the_objective_is_transformers_loss_with_its_aux_loss(family, pad):
    model = make_tiny_moe(family)
    batch = _batch(pad=pad)
    router = RouterLoss.of(model)
    assert router == RouterLoss(0.1, 4, 2)
    n = int((batch["labels"][:, 1:] != -100).sum())
    objective, loss_sum, aux, tokens = micro_batch_loss(model, batch, 4, n, router)
    reference = model(**batch, output_router_logits=True)
    assert tokens == n
    torch.testing.assert_close(aux, reference.aux_loss.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(objective, reference.loss, rtol=1e-5, atol=1e-6)
    assert float(aux.detach()) > 1.0  # not 0: the term really is in the objective
    assert abs(float((objective - loss_sum / n).detach()) - 0.1 * float(aux.detach())) < 1e-5


def test_the_objective_gradient_is_transformers_gradient():
    ours, theirs = make_tiny_moe("mixtral"), make_tiny_moe("mixtral")
    batch = _batch(pad=2)
    n = int((batch["labels"][:, 1:] != -100).sum())
    micro_batch_loss(ours, batch, 4, n, RouterLoss.of(ours))[0].backward()
    theirs(**batch, output_router_logits=True).loss.backward()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_uniform_routing_gives_top_k():
    logits = (torch.zeros(6, 4), torch.zeros(6, 4))
    # every probability is 1/4; ties go to the same 2 experts: f = (2, 2, 0, 0)... sum f P = 1
    assert float(balance_loss(logits, 4, 2)) == pytest.approx(4 * (1 + 1) * 0.25)


def test_no_loss_unless_the_config_asks_and_missing_settings_are_named():
    model = make_tiny_moe("qwen3_moe", output_router_logits=False)
    assert RouterLoss.of(model) is None
    dense = make_tiny_llama()
    assert RouterLoss.of(dense) is None
    dense.config.output_router_logits = True  # asked for, on a model without the settings
    with pytest.raises(ConfigError, match="no router_aux_loss_coef, num_experts, num_exp"):
        RouterLoss.of(dense)


def test_the_loop_trains_with_the_aux_loss_and_logs_it(tmp_path):
    model = get_peft_model(
        make_tiny_moe("qwen3_moe"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    batches = [_batch(pad=2), _batch(pad=0)]
    config = TrainConfig(
        precision="fp32",
        lr=1e-2,
        max_steps=3,
        grad_accum_steps=2,
        warmup_steps=0,
        progress="none",
        tensorboard=False,
        plots=False,
    )
    train(model, None, batches, batches, config, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "train"]
    assert len(steps) == 3 and all(r["aux_loss"] > 1.0 for r in steps)
    # two micro-batches: the token-weighted mean of their balance terms
    evals = [r for r in rows if r["kind"] == "eval"]
    assert evals and all(r["eval_aux_loss"] > 1.0 for r in evals)
    metrics = eval_loss(model, batches)
    assert metrics["eval_aux_loss"] == pytest.approx(evals[-1]["eval_aux_loss"], rel=1e-6)


def test_generation_works_when_the_config_asks_for_router_logits():
    from lorakit.train.evaluate import generate_samples
    from serve_support import make_tokenizer

    model = make_tiny_moe("qwen3_moe", vocab_size=260)
    assert model.config.output_router_logits
    samples = generate_samples(model, make_tokenizer(), ["Hi", "A longer prompt"], 4)
    assert [s["prompt"] for s in samples] == ["Hi", "A longer prompt"]
