"""Reading an adapter folder for `from_pretrained` / `load_adapter` (lorakit.lora.compat.reading):
peft's keywords (subfolder, config=, the device ones), refusals by name."""

from __future__ import annotations

import peft
import pytest
import torch
from peft_oracle import twin_models

import lorakit
from conftest import make_tiny_llama
from lorakit.errors import AdapterError, ConfigError


def test_from_pretrained_and_load_adapter_take_peft_keywords(tmp_path):
    ours, theirs = twin_models(
        make_tiny_llama(), target_modules=["q_proj"], init_lora_weights=False
    )
    ours.save_pretrained(tmp_path / "root" / "sub")
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    want = ours(input_ids=ids).logits
    loaded = lorakit.PeftModel.from_pretrained(
        make_tiny_llama(),
        tmp_path / "root",
        subfolder="sub",
        torch_device="cpu",
        device_map="cpu",
        low_cpu_mem_usage=True,
        autocast_adapter_dtype=True,
    )
    torch.testing.assert_close(loaded(input_ids=ids).logits, want)
    result = loaded.load_adapter(tmp_path / "root" / "sub", "second", torch_device="cpu")
    assert result.missing_keys == [] and result.unexpected_keys == []
    # config= replaces the folder's config, as in peft
    bigger = lorakit.LoraConfig(target_modules=["q_proj"], lora_alpha=16)
    scaled = lorakit.PeftModel.from_pretrained(
        make_tiny_llama(), tmp_path / "root/sub", config=bigger
    )
    assert scaled.peft_config["default"].lora_alpha == 16
    with pytest.raises(TypeError, match="unexpected keyword"):
        lorakit.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "root/sub", colour="red")
    with pytest.raises(ConfigError, match="not supported by lorakit"):
        lorakit.PeftModel.from_pretrained(
            make_tiny_llama(), tmp_path / "root/sub", ephemeral_gpu_offload=True
        )
    with pytest.raises(AdapterError, match="downloading adapters is not supported by lorakit"):
        lorakit.PeftModel.from_pretrained(make_tiny_llama(), "org/adapter", revision="main")


def test_a_peft_config_object_is_refused_as_config(tmp_path):
    model = lorakit.get_peft_model(make_tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="expected a lorakit LoraConfig, got LoraConfig"):
        lorakit.PeftModel.from_pretrained(
            make_tiny_llama(), tmp_path, config=peft.LoraConfig(target_modules=["q_proj"])
        )
    with pytest.raises(AdapterError):  # a missing local folder without hub keywords: not found
        lorakit.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "missing")
