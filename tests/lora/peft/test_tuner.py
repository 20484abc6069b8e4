"""`lora_model.base_model`, the tuner level (lorakit.lora.compat.tuner): peft's nesting of
names and paths, the wrapped model's attributes and the owner's adapter methods through it."""

from __future__ import annotations

import torch
from peft_oracle import twin_models
from torch import nn

import lorakit
from conftest import make_tiny_llama


def test_parameter_names_and_paths_nest_as_peft_does():
    ours, theirs = twin_models(
        make_tiny_llama(), target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert ours.base_model.model is ours.get_base_model()
    q = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, lorakit.LoraLinear)
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
    # the tuner level forwards to the wrapped model and to the adapter methods
    assert ours.base_model.config is ours.get_base_model().config
    assert ours.base_model.peft_config is ours.peft_config


def test_active_adapter_is_a_name_for_one_adapter_and_a_list_for_several():
    model = lorakit.get_peft_model(
        nn.Sequential(nn.Linear(4, 4)), lorakit.LoraConfig(target_modules=["0"])
    )
    model.add_adapter("other", lorakit.LoraConfig(target_modules=["0"]))
    tuner = model.base_model
    assert tuner.active_adapter == "default"
    model.set_adapter(["default", "other"])
    assert tuner.active_adapter == ["default", "other"]
    assert tuner.set_adapter == model.set_adapter  # peft's tuner methods are the owner's
    assert tuner.prefix == "lora_"
    x = torch.randn(2, 4)
    torch.testing.assert_close(tuner(x), model.get_base_model()(x))  # forward: the wrapped model
    assert not hasattr(tuner, "no_such_attribute")
