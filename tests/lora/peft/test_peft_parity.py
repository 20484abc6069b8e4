"""lorakit equals peft (the oracle) on the same weights: forward, merge, combination, mixed rows."""

from __future__ import annotations

import io
from contextlib import redirect_stdout

import pytest
import torch
from peft_oracle import add_twin_adapter, twin_models
from torch import nn

from conftest import make_tiny_gpt2, make_tiny_llama

ATOL = 1e-5  # fp32: same math, only the summation order of small matmuls may differ


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


CASES = {
    "mlp": (mlp, dict(target_modules=["0", "2"]), lambda: {"input": torch.randn(4, 16)}),
    "llama": (
        make_tiny_llama,
        dict(
            target_modules=[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
        ),
        lambda: {"input_ids": torch.randint(0, 128, (4, 12))},
    ),
    "gpt2": (
        make_tiny_gpt2,
        dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
        lambda: {"input_ids": torch.randint(0, 128, (4, 12))},
    ),
}


def run(model, inputs, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        if "input" in inputs:
            return model(inputs["input"], **kwargs)
        return model(**inputs, **kwargs).logits


def build(case: str, **extra):
    make, config, inputs = CASES[case]
    config = dict(config, r=4, lora_alpha=8, init_lora_weights=False, **extra)
    ours, theirs = twin_models(make(), **config)
    ours.eval(), theirs.eval()
    return ours, theirs, inputs(), config


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_merged_forward_equal_peft(case):
    ours, theirs, inputs, _ = build(case)
    with ours.disable_adapter():
        base = run(ours, inputs)
    assert torch.allclose(run(ours, inputs), run(theirs, inputs), atol=ATOL)
    merged_ours = ours.merge_and_unload()
    merged_theirs = theirs.merge_and_unload()
    assert torch.allclose(run(merged_ours, inputs), run(merged_theirs, inputs), atol=ATOL)
    # the adapter is random (init_lora_weights=False), so merging must change the outputs
    assert not torch.allclose(run(merged_ours, inputs), base, atol=1e-3)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("extra", [{"use_rslora": True}, {"bias": "all"}, {"lora_alpha": 3}])
def test_config_variants_equal_peft(case, extra):
    ours, theirs, inputs, _ = build(case, **{k: v for k, v in extra.items() if k != "lora_alpha"})
    assert torch.allclose(run(ours, inputs), run(theirs, inputs), atol=ATOL)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("combination", ["linear", "cat", "svd"])
def test_add_weighted_adapter_equals_peft(case, combination):
    ours, theirs, inputs, config = build(case)
    add_twin_adapter(ours, theirs, "other", **config)
    for model in (ours, theirs):
        model.add_weighted_adapter(["default", "other"], [0.7, -0.4], "mix", combination)
        model.set_adapter("mix")
    assert torch.allclose(run(ours, inputs), run(theirs, inputs), atol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_mixed_adapter_rows_equal_peft_and_single_runs(case):
    ours, theirs, inputs, config = build(case)
    add_twin_adapter(ours, theirs, "other", **config)
    names = ["default", "__base__", "other", "default"]
    mixed = run(ours, inputs, adapter_names=names)
    assert torch.allclose(mixed, run(theirs, inputs, adapter_names=names), atol=ATOL)
    for row, name in enumerate(names):
        one = {k: v[row : row + 1] for k, v in inputs.items()}
        if name == "__base__":
            with ours.disable_adapter():
                alone = run(ours, one)
        else:
            ours.set_adapter(name)
            alone = run(ours, one)
        assert torch.allclose(mixed[row : row + 1], alone, atol=ATOL)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("extra", [{}, {"bias": "all"}, {"bias": "lora_only"}])
def test_trainable_parameter_counts_equal_peft(case, extra):
    ours, theirs, _, _ = build(case, **extra)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    out_ours, out_theirs = io.StringIO(), io.StringIO()
    with redirect_stdout(out_ours):
        ours.print_trainable_parameters()
    with redirect_stdout(out_theirs):
        theirs.print_trainable_parameters()
    assert out_ours.getvalue() == out_theirs.getvalue()


def test_modules_to_save_equals_peft():
    _, config, inputs = CASES["llama"]
    ours, theirs = twin_models(
        make_tiny_llama(), **dict(config, r=4, init_lora_weights=False, modules_to_save=["lm_head"])
    )
    with torch.no_grad():  # make the copies differ from the original head
        for model in (ours, theirs):
            for name, p in model.named_parameters():
                if "modules_to_save" in name:
                    p.fill_(0.01)
    x = inputs()
    assert torch.allclose(run(ours, x), run(theirs, x), atol=ATOL)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_embedding_adapter_equals_peft():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 4))
    ours, theirs = twin_models(base, r=2, target_modules=["0", "1"], init_lora_weights=False)
    ids = torch.randint(0, 20, (3, 5))
    assert torch.allclose(ours(ids), theirs(ids), atol=ATOL)
    assert torch.allclose(ours.merge_and_unload()(ids), theirs.merge_and_unload()(ids), atol=ATOL)
