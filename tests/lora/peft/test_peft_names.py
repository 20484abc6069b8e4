"""peft's state-dict helpers (lorakit.lora.compat.peft_names): `get_peft_model_state_dict` with
peft's file key names, `set_peft_model_state_dict` with peft's load result."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import lorakit
from lorakit.errors import AdapterError


def _model() -> lorakit.LoraModel:
    base = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    return lorakit.get_peft_model(base, lorakit.LoraConfig(target_modules=["0"], r=2))


def test_state_dict_helpers_round_trip_peft_keys():
    model = _model()
    saved = lorakit.get_peft_model_state_dict(model)
    assert sorted(saved) == ["base_model.model.0.lora_A.weight", "base_model.model.0.lora_B.weight"]
    changed = {k: torch.full_like(v, 0.5) for k, v in saved.items()}
    result = lorakit.set_peft_model_state_dict(model, changed)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(model.base_model.model[0].lora_B["default"].weight, torch.full((4, 2), 0.5))
    partial = lorakit.set_peft_model_state_dict(model, {"x.weight": torch.zeros(1)})
    assert partial.unexpected_keys == ["x.weight"]
    assert partial.missing_keys == [
        "base_model.model.0.lora_A.default.weight",
        "base_model.model.0.lora_B.default.weight",
    ]


def test_set_state_dict_loads_base_biases_as_peft_does():
    """A state dict saved with bias='all' restores the biases into a model made with
    bias='none', as peft's whole-model load does."""
    base = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    source = lorakit.get_peft_model(
        copy.deepcopy(base), lorakit.LoraConfig(target_modules=["0"], bias="all")
    )
    with torch.no_grad():
        for name, p in source.named_parameters():
            if name.endswith("bias"):
                p.fill_(1.23)
    state = lorakit.get_peft_model_state_dict(source)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["0"]))
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(target_modules=["0"]))
    peft.set_peft_model_state_dict(theirs, state)
    result = lorakit.set_peft_model_state_dict(ours, state)
    assert result.unexpected_keys == []
    x = torch.randn(3, 4)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours(x), source(x))


def test_a_given_state_dict_and_a_wrong_shape_are_refused():
    model = _model()
    with pytest.raises(AdapterError, match=r"state_dict=...\) is not supported by lorakit"):
        lorakit.get_peft_model_state_dict(model, state_dict={})
    # lora_A of rank 2 over 4 inputs is (2, 4); a rank-3 tensor does not fit
    wrong = {"base_model.model.0.lora_A.weight": torch.zeros(3, 4)}
    with pytest.raises(
        AdapterError, match=r"has shape \[3, 4\] but adapter `default` needs \[2, 4\]"
    ):
        lorakit.set_peft_model_state_dict(model, wrong)
