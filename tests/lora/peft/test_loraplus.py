"""LoRA+'s one grouping rule (`compat.loraplus.loraplus_roles`), as lorakit's own optimizer and
peft's `create_loraplus_optimizer` use it (the latter is compared with peft in
test_peft_surface.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit.errors import ConfigError
from lorakit.lora.compat.loraplus import loraplus_roles
from lorakit.train.config import TrainConfig
from lorakit.train.optim import build_optimizer


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)


def _model():
    config = lorakit.LoraConfig(target_modules=["embed", "proj"], r=2, bias="lora_only")
    return lorakit.get_peft_model(_Net(), config)


def test_roles():
    roles = {n.removeprefix("base_model.model."): r for n, _, r in loraplus_roles(_model())}
    assert roles == {
        "embed.lora_embedding_A.default": "embedding",
        "embed.lora_embedding_B.default": "embedding",
        "proj.base_layer.bias": "B",
        "proj.lora_A.default.weight": "A",
        "proj.lora_B.default.weight": "B",
    }


def test_lorakit_optimizer_puts_b_and_vectors_at_lora_b_lr():
    optimizer, params = build_optimizer(
        _model(), TrainConfig(lr=1e-3, weight_decay=0.1, lora_b_lr=1e-2)
    )
    shape = [
        (g["lr"], g["weight_decay"], [tuple(p.shape) for p in g["params"]])
        for g in optimizer.param_groups
    ]
    assert shape == [
        (1e-3, 0.1, [(2, 10), (4, 2), (2, 4)]),  # embedding A, B; proj's lora_A
        (1e-2, 0.1, [(4, 2)]),  # proj's lora_B
        (1e-2, 0.0, [(4,)]),  # proj's bias
    ]
    assert len(params) == 5


def test_no_trainable_parameters_is_a_config_error_in_both():
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer(frozen, TrainConfig(lr=1e-3))
    with pytest.raises(ConfigError, match="no trainable parameters"):
        lorakit.create_loraplus_optimizer(frozen, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=4)
