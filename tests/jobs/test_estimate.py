"""`lorakit estimate`: exact parameter counts from the meta-device build, and the arithmetic."""

from __future__ import annotations

import math

import pytest
import yaml

from conftest import make_tiny_llama
from lorakit import LoraConfig, get_peft_model
from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.jobs.estimate import MIB, RUNTIME_CPU, estimate_memory, model_shape
from lorakit.jobs.run_config import load_run_config
from lorakit.quant import quantize_model


@pytest.fixture
def run_file(tmp_path):
    """A run config over a saved tiny Llama (2 blocks, width 32, vocab 128)."""
    folder = tmp_path / "tiny"
    make_tiny_llama().save_pretrained(folder)
    data = {
        "model": {"name_or_path": str(folder)},
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"max_length": 16, "packing": True},
        "train": {"batch_size": 4, "precision": "fp32", "device": "cpu"},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def parts(estimate) -> dict[str, int]:
    return {name: n for name, n, _ in estimate.parts}


def test_counts_equal_the_real_model(run_file):
    run = load_run_config(run_file)
    shape = model_shape(run)
    lora = get_peft_model(
        make_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    trainable, total = lora.get_nb_trainable_parameters()
    assert shape.trainable == trainable
    assert shape.frozen + shape.trainable == total
    assert (shape.layers, shape.hidden, shape.intermediate, shape.vocab) == (2, 32, 64, 128)
    # q_proj and v_proj read the same input: saved once, width 32
    assert shape.adapted_inputs == 32
    quantized = model_shape(load_run_config(run_file, ["model.quantization=nf4"]))
    expected = quantize_model(make_tiny_llama(), "nf4")
    n_quantized = sum(
        m.in_features * m.out_features
        for m in expected.modules()
        if type(m).__name__ == "QuantLinear"
    )
    assert (
        quantized.quantized == n_quantized and quantized.frozen == total - trainable - n_quantized
    )


def test_the_arithmetic_of_one_process(run_file):
    run = load_run_config(run_file)
    shape = model_shape(run)
    got = parts(estimate_memory(run, 1))
    w = shape.trainable
    assert got["parameters"] == (shape.frozen + w) * 4  # all fp32
    assert got["gradients"] == w * 4 and got["optimizer"] == 2 * w * 4
    # 4 rows x 16 tokens, h=32, I=64: 6bTh + 3bTI + bT*32 (the q/v input), fp32, packed rows;
    # 2 blocks saved plus one block's working set
    bt = 4 * 16
    per_block = (6 * bt * 32 + 3 * bt * 64 + bt * 32) * 4
    assert got["activations"] == 3 * per_block
    assert got["loss"] == bt * 128 * 4  # one chunk of fp32 logits (64 < 1024 rows)
    assert got["runtime"] == RUNTIME_CPU
    assert "all-reduce" not in got


def test_fsdp_divides_the_states_and_ddp_adds_the_all_reduce(run_file):
    one = parts(estimate_memory(load_run_config(run_file), 1))
    fsdp = parts(estimate_memory(load_run_config(run_file, ["train.distributed=fsdp"]), 4))
    assert fsdp["parameters"] == one["parameters"] // 4
    assert fsdp["optimizer"] == one["optimizer"] // 4
    assert fsdp["gradients"] == one["gradients"] // 4
    assert fsdp["fsdp gather"] > 0
    # one row per rank instead of 4 rows: a quarter of the saved activations
    assert fsdp["activations"] == one["activations"] // 4
    ddp = parts(estimate_memory(load_run_config(run_file), 2))
    shape = model_shape(load_run_config(run_file))
    assert ddp["all-reduce"] == 2 * shape.trainable * 4
    assert ddp["parameters"] == one["parameters"]
    with pytest.raises(ConfigError, match="not supported by lorakit"):
        estimate_memory(load_run_config(run_file, ["train.distributed=fsdp", "method=full"]), 2)


def test_gradient_checkpointing_keeps_block_inputs_only(run_file):
    plain = parts(estimate_memory(load_run_config(run_file), 1))
    saved = parts(
        estimate_memory(load_run_config(run_file, ["train.gradient_checkpointing=true"]), 1)
    )
    bt = 4 * 16
    per_block = plain["activations"] // 3
    assert saved["activations"] == 2 * bt * 32 * 4 + 2 * per_block
    assert math.isclose(plain["activations"] / per_block, 3)


def test_cli_prints_the_table(run_file, capsys):
    assert main(["estimate", str(run_file), "train.batch_size=8", "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 process(es)" in out and "rows per rank=4" in out
    total = next(line for line in out.splitlines() if line.startswith("total"))
    value = float(total.split()[1])
    run = load_run_config(run_file, ["train.batch_size=8"])
    assert value == pytest.approx(estimate_memory(run, 2).total / MIB, abs=0.05)


def test_a_moe_config_counts_quantized_experts_and_their_lora(tmp_path):
    from moe_support import expert_parameters, make_tiny_moe

    folder = tmp_path / "moe"
    make_tiny_moe().save_pretrained(folder)
    lora = {"r": 4, "target_modules": ["q_proj"], "target_parameters": ["gate_up_proj"]}
    data = {
        "model": {"name_or_path": str(folder), "quantization": "nf4"},
        "lora": lora,
        "data": {"max_length": 16, "packing": True},
        "train": {"batch_size": 2, "precision": "fp32", "device": "cpu"},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    shape = model_shape(load_run_config(path))
    real = quantize_model(make_tiny_moe(), "nf4")
    experts = expert_parameters(real)
    assert shape.expert_quantized == sum(p.numel() for p in experts.values()) > 0
    quantized_linear = sum(
        m.in_features * m.out_features for m in real.modules() if type(m).__name__ == "QuantLinear"
    )
    assert shape.quantized == shape.expert_quantized + quantized_linear
    peft_like = get_peft_model(make_tiny_moe(), LoraConfig(**lora))
    on_experts = sum(
        p.numel() for n, p in peft_like.named_parameters() if "experts" in n and p.requires_grad
    )
    assert shape.expert_trainable == on_experts == 2 * 4 * 4 * (64 + 128)  # layers, experts, r
    assert shape.intermediate == 2 * 64  # two experts per token, each 64 wide
    text = estimate_memory(load_run_config(path)).table()
    assert f"({shape.expert_quantized:,} in experts)" in text
