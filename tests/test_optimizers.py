"""`lorakit.optimizers.create_loraplus_optimizer`: peft's `peft.optimizers` path, the same
parameter groups as peft's on the same model."""

from __future__ import annotations

import peft
import torch
from peft.optimizers import create_loraplus_optimizer as peft_loraplus
from tests.conftest import make_tiny_llama

import lorakit
from lorakit.optimizers import create_loraplus_optimizer


def test_groups_equal_peft_groups():
    config = {"r": 2, "target_modules": ["q_proj", "v_proj", "embed_tokens"]}
    ours = lorakit.get_peft_model(make_tiny_llama(), lorakit.LoraConfig(**config))
    theirs = peft.get_peft_model(make_tiny_llama(), peft.LoraConfig(**config))
    kwargs = {"lr": 1e-3, "loraplus_lr_ratio": 16.0, "loraplus_weight_decay": 0.1}
    mine = create_loraplus_optimizer(ours, torch.optim.AdamW, **kwargs)
    peft_opt = peft_loraplus(model=theirs, optimizer_cls=torch.optim.AdamW, **kwargs)
    assert len(mine.param_groups) == len(peft_opt.param_groups)
    for a, b in zip(mine.param_groups, peft_opt.param_groups, strict=True):
        assert (a["lr"], a["weight_decay"]) == (b["lr"], b["weight_decay"])
        assert [p.shape for p in a["params"]] == [p.shape for p in b["params"]]
    assert create_loraplus_optimizer is lorakit.create_loraplus_optimizer
