"""Mixture-of-experts parameters, `all-linear`'s parameters and coverage (`lora/moe.py`)."""

from __future__ import annotations

import lorakit
from lorakit.lora.moe import all_linear_parameters, coverage, expert_parameters
from moe_models import MOE_CONFIGS, tiny_model


def test_experts_and_routers_are_found_by_shape_not_by_family():
    qwen = tiny_model("qwen3_moe")
    found = expert_parameters(qwen)
    assert ("model.layers.0.mlp.experts", "gate_up_proj") in found
    assert ("model.layers.0.mlp.experts", "down_proj") in found
    assert ("model.layers.0.mlp.gate", "weight") in found
    assert all_linear_parameters(qwen) == ["down_proj", "gate.weight", "gate_up_proj"]
    gpt_oss = tiny_model("gpt_oss")  # biases of the experts are not weights to adapt
    assert all_linear_parameters(gpt_oss) == ["down_proj", "gate_up_proj", "router.weight"]


def test_a_convolution_is_not_an_expert_stack():
    assert "conv1d.weight" not in all_linear_parameters(tiny_model("qwen3_next"))


def test_coverage_counts_decoder_weights_adapted():
    model = tiny_model("mixtral")
    assert coverage(model)[0] == 0
    attention = lorakit.get_peft_model(
        model, lorakit.LoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    )
    done, total = coverage(attention.get_base_model())
    layer = MOE_CONFIGS["mixtral"][1]
    h, experts, inter = layer["hidden_size"], layer["num_local_experts"], 12
    attn = h * h * 2 + 2 * 8 * h  # q, o (16x16) and k, v (8x16)
    moe = experts * (2 * inter * h + h * inter) + experts * h  # stacks and router
    assert (done, total) == (2 * attn, 2 * (attn + moe))
