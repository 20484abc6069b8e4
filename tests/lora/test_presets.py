"""Per-architecture target presets (`lorakit.lora.presets`)."""

from __future__ import annotations

from transformers import GPTNeoXConfig

from conftest import make_tiny_gpt2, make_tiny_llama
from lorakit.lora.presets import target_preset

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_target_presets_by_model_type():
    llama, gpt2 = make_tiny_llama(), make_tiny_gpt2()
    assert target_preset(llama) == PROJECTIONS
    assert target_preset(llama.config) == PROJECTIONS
    assert target_preset({"model_type": "qwen2"}) == PROJECTIONS
    assert target_preset("mistral") == PROJECTIONS
    assert target_preset(gpt2) == ["c_attn", "c_proj", "c_fc"]
    neox = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    assert target_preset(GPTNeoXConfig()) == neox
    assert target_preset("bloom") == neox
    assert target_preset("t5") is None
    assert target_preset(object()) is None


def test_every_preset_name_exists_in_tiny_models():
    for model in (make_tiny_llama(), make_tiny_gpt2()):
        suffixes = {name.split(".")[-1] for name, _ in model.named_modules()}
        assert set(target_preset(model)) <= suffixes
