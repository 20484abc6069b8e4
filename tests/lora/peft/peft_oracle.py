"""Helpers that build the same adapter in lorakit and in peft (the oracle) for comparisons."""

from __future__ import annotations

import copy

import peft
import torch
from torch import nn

import lorakit


def twin_models(base: nn.Module, **config) -> tuple[lorakit.LoraModel, nn.Module]:
    """(lorakit model, peft model) on copies of `base`, with lorakit's LoRA weights set to
    peft's."""
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**config))
    copy_adapter(theirs, ours, "default")
    return ours, theirs


def add_twin_adapter(ours, theirs, name: str, **config) -> None:
    """Add adapter `name` to both and copy peft's weights into lorakit's."""
    theirs.add_adapter(name, peft.LoraConfig(**config))
    ours.add_adapter(name, lorakit.LoraConfig(**config))
    copy_adapter(theirs, ours, name)


@torch.no_grad()
def copy_adapter(theirs, ours, name: str) -> None:
    """Copy every tensor of peft adapter `name` (LoRA, module copies, biases) into lorakit's."""
    their_params = {k.removeprefix("base_model.model."): v for k, v in theirs.named_parameters()}
    ours_params = dict(ours.get_base_model().named_parameters())
    copied = 0
    for key, param in ours_params.items():
        if f".{name}" not in key and not key.endswith("bias"):
            continue
        if key in their_params:
            param.copy_(their_params[key])
            copied += 1
    assert copied > 0, "no adapter tensors copied"
