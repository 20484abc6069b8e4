"""`create_loraplus_optimizer`: peft's LoRA+ optimizer builder, for programs that call it.

LoRA+ trains the B matrices at `loraplus_lr_ratio` times the learning rate of the A matrices.
Parameter groups, as peft forms them: A matrices and other matrices at `lr`; B matrices and every
1-D tensor at `lr * loraplus_lr_ratio` (biases and LayerNorm weights among them without weight
decay); embedding adapters at `loraplus_lr_embedding` (default 1e-6). The decayed groups use
`loraplus_weight_decay` (default 0). lorakit's own loop gets LoRA+ from `train.lora_b_lr`
instead (see `optim.build_optimizer`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.errors import ConfigError


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer],
    *,
    lr: float,
    loraplus_lr_ratio: float,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """`optimizer_cls` over the trainable parameters in LoRA+'s groups; other keywords go to it."""
    if not loraplus_lr_ratio > 0:
        raise ConfigError(f"loraplus_lr_ratio={loraplus_lr_ratio!r}: expected a positive number")
    embedding_lr = kwargs.pop("loraplus_lr_embedding", 1e-6)
    weight_decay = kwargs.pop("loraplus_weight_decay", 0.0)
    undecayed = _undecayed_names(model)
    groups: dict[str, list[nn.Parameter]] = {"a": [], "embedding": [], "b": [], "b_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if ".lora_embedding_" in name:
            groups["embedding"].append(param)
        elif ".lora_B." in name or param.ndim == 1:
            groups["b_no_decay" if name in undecayed else "b"].append(param)
        else:
            groups["a"].append(param)
    b_lr = lr * loraplus_lr_ratio
    settings = {
        "a": {"lr": lr, "weight_decay": weight_decay},
        "embedding": {"lr": embedding_lr, "weight_decay": weight_decay},
        "b": {"lr": b_lr, "weight_decay": weight_decay},
        "b_no_decay": {"lr": b_lr, "weight_decay": 0.0},
    }
    if not any(groups.values()):
        raise ConfigError("the model has no trainable parameters; add an adapter first")
    # all four groups, empty ones too, in peft's order (so optimizer states line up with peft's)
    param_groups = [{"params": ps, **settings[k]} for k, ps in groups.items()]
    return optimizer_cls(param_groups, lr=lr, **kwargs)


def _undecayed_names(model: nn.Module) -> set[str]:
    """Names with "bias" in them and the parameters of `nn.LayerNorm` layers."""
    names = set()
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, nn.LayerNorm) or "bias" in full:
                names.add(full)
    return names
