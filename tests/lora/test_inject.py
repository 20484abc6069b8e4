"""Target matching rules, the no-match error, and the functional API."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import make_tiny_llama
from lorakit import (
    ConfigError,
    LoraConfig,
    LoraLinear,
    check_gradients,
    check_injection,
    get_peft_model,
    inject_lora,
    lora_state_dict,
)
from lorakit.lora.inject import find_targets


def names(model, **config) -> list[str]:
    return [n for n, _ in find_targets(model, LoraConfig(**config))]


def test_list_entry_matches_full_name_or_dotted_suffix(tiny_llama):
    found = names(tiny_llama, target_modules=["q_proj", "model.layers.1.mlp.down_proj"])
    assert found == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
    ]


def test_partial_suffix_does_not_match(tiny_llama):
    with pytest.raises(ConfigError, match="matched no layer"):
        names(tiny_llama, target_modules=["_proj"])


def test_string_is_a_full_regex_match(tiny_llama):
    assert names(tiny_llama, target_modules=r".*layers\.0\.self_attn\.(q|k)_proj") == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
    ]


def test_all_linear_skips_the_output_head(tiny_llama):
    found = names(tiny_llama, target_modules="all-linear")
    assert len(found) == 14 and not any("lm_head" in n for n in found)  # 7 per layer x 2


def test_class_name_matches_by_type(tiny_llama):
    found = names(tiny_llama, target_modules=["Embedding"])
    assert found == ["model.embed_tokens"]
    assert len(names(tiny_llama, target_modules=["Linear"])) == 15  # includes lm_head


def test_exclude_and_layers_to_transform(tiny_llama):
    found = names(
        tiny_llama,
        target_modules=["q_proj", "v_proj"],
        exclude_modules=["v_proj"],
        layers_to_transform=1,
    )
    assert found == ["model.layers.1.self_attn.q_proj"]


def test_no_match_lists_layer_names_and_suggests_preset(tiny_llama):
    with pytest.raises(ConfigError) as error:
        names(tiny_llama, target_modules=["c_attn"])
    message = str(error.value)
    assert "matched no layer of LlamaForCausalLM" in message
    assert "q_proj" in message and "down_proj" in message


def test_targeting_a_container_is_a_clear_error(tiny_llama):
    with pytest.raises(ConfigError, match="is a LlamaAttention, which LoRA cannot wrap"):
        names(tiny_llama, target_modules=["self_attn"])


def test_missing_target_modules_is_a_clear_error(tiny_llama):
    with pytest.raises(ConfigError, match="target_modules is not set"):
        get_peft_model(tiny_llama, LoraConfig())


def test_functional_api_injects_reports_and_checks_gradients():
    model = make_tiny_llama()
    inject_lora(model, target_modules=["q_proj", "v_proj"], rank=4, lora_alpha=8)
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoraLinear)
    report = check_injection(model)
    assert len(report.lora_layers) == 4 and not report.trainable_base
    # 4 layers x (A 4x32 + B) : q (out 32) -> 128+128, v (out 16) -> 128+64
    assert report.trainable_lora == 2 * (128 + 128) + 2 * (128 + 64)
    state = lora_state_dict(model)
    assert len(state) == 8 and all("lora_" in k for k in state)
    ids = torch.randint(0, 128, (2, 5))
    model(input_ids=ids, labels=ids).loss.backward()
    # B = 0 at init: A gets zero gradient on the first backward, B a real one
    missing = check_gradients(model)
    assert missing and all("lora_A" in n for n in missing)


def test_check_injection_flags_trainable_base_params():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    inject_lora(model, target_modules=["0"], rank=2)
    model[1].weight.requires_grad_(True)
    assert check_injection(model).trainable_base == ["1.weight"]


def test_preset_targets_are_written_out_in_the_saved_config(tiny_llama, tmp_path):
    model = get_peft_model(tiny_llama, LoraConfig(r=2, target_modules="preset"))
    model.save_pretrained(tmp_path)
    saved = LoraConfig.load(tmp_path)
    assert saved.target_modules == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
