"""`AutoPeftModelForCausalLM` (lorakit.lora.compat.auto): an adapter folder loaded with the base
model its config names."""

from __future__ import annotations

import pytest
import torch
import transformers

import lorakit
from lorakit.errors import AdapterError


def test_auto_peft_model_loads_base_and_adapter(tmp_path):
    from tiny_folders import save_tiny

    folder = save_tiny(tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    ours = lorakit.get_peft_model(
        model, lorakit.LoraConfig(target_modules=["q_proj"], init_lora_weights=False)
    )
    assert ours.peft_config["default"].base_model_name_or_path == str(folder)
    ours.save_pretrained(tmp_path / "adapter")
    loaded = lorakit.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[10, 20, 30]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, ours(input_ids=ids).logits)
    (tmp_path / "lonely").mkdir()
    lorakit.LoraConfig(target_modules=["q_proj"]).save_pretrained(tmp_path / "lonely")
    with pytest.raises(AdapterError, match="names no base_model_name_or_path"):
        lorakit.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "lonely")


def test_the_class_is_not_instantiated():
    with pytest.raises(
        TypeError, match=r"use AutoPeftModelForCausalLM.from_pretrained\(adapter_dir\)"
    ):
        lorakit.AutoPeftModelForCausalLM()
