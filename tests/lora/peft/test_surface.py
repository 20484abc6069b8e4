"""The part of `LoraModel` only peft programs and `Trainer` use, and peft's functional entry point
(lorakit.lora.compat.surface): `inject_adapter_in_model` against peft, the task type's head,
the trainer's weight file, the refused hub upload."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit.errors import AdapterError
from lorakit.files import current_umask
from lorakit.lora.compat.surface import TRAINER_WEIGHTS, peft_model_config


def test_inject_adapter_in_model_equals_peft():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    config = {"target_modules": ["0", "2"], "r": 2, "init_lora_weights": False}
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**config), copy.deepcopy(base))
    ours = lorakit.inject_adapter_in_model(lorakit.LoraConfig(**config), copy.deepcopy(base))
    names = [(n, p.requires_grad) for n, p in theirs.named_parameters()]
    assert [(n, p.requires_grad) for n, p in ours.named_parameters()] == names
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 4)
    torch.testing.assert_close(ours(x), theirs(x))


class _Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.classifier = nn.Linear(4, 2)


def test_a_classification_task_trains_its_head_in_full_and_keeps_the_revision():
    config = lorakit.LoraConfig(target_modules=["body"], task_type="SEQ_CLS")
    made = peft_model_config(_Classifier(), config, {"revision": "v2"})
    assert made.modules_to_save == ["classifier"]  # SEQ_CLS: `classifier` or `score`, if present
    assert made.extra["revision"] == "v2"
    assert config.modules_to_save is None  # the caller's config is left as it was
    plain = lorakit.LoraConfig(target_modules=["body"], task_type="CAUSAL_LM")
    assert peft_model_config(_Classifier(), plain, {}) is plain  # no head for a causal LM


def test_trainer_weights_hold_the_trainable_tensors_only(tmp_path):
    model = lorakit.get_peft_model(
        nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), lorakit.LoraConfig(target_modules=["0"])
    )
    model._save_trainer_weights(tmp_path)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "base_model.model.0.lora_A.default.weight",
        "base_model.model.0.lora_B.default.weight",
    }
    assert set(load_file(str(tmp_path / TRAINER_WEIGHTS))) == trainable
    # what the file leaves out, so Trainer does not warn about the frozen base it did not find
    assert set(model._keys_to_ignore_on_save) == set(model.state_dict()) - trainable
    # the mode a new file gets (the adapter files beside it), not safetensors' 0600
    mode = (tmp_path / TRAINER_WEIGHTS).stat().st_mode & 0o777
    assert mode == 0o666 & ~current_umask()


def test_push_to_hub_is_refused_with_the_way_to_upload():
    model = lorakit.get_peft_model(
        nn.Sequential(nn.Linear(4, 4)), lorakit.LoraConfig(target_modules=["0"])
    )
    with pytest.raises(AdapterError, match="upload that folder with huggingface_hub"):
        model.push_to_hub("org/adapter")
