"""LoRA+ (B matrices at a higher learning rate than A): its one grouping rule, and peft's
`create_loraplus_optimizer` for programs that call it.

`loraplus_roles` is the rule, peft's, used by both builders:

    embedding  embedding adapters (lora_embedding_A / lora_embedding_B)
    B          lora_B matrices and every 1-D tensor (biases, norms, DoRA magnitudes)
    A          everything else that trains (lora_A, other matrices)

`create_loraplus_optimizer` gives A `lr`, B `lr * loraplus_lr_ratio` (biases and LayerNorm
weights without weight decay), embedding adapters `loraplus_lr_embedding` (default 1e-6); the
decayed groups use `loraplus_weight_decay` (default 0). lorakit's own loop takes LoRA+ from
`train.lora_b_lr` (`train.optim.build_optimizer`): B at `lora_b_lr`, A and embedding adapters
at `lr`.
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
    for name, param, role in loraplus_roles(model):
        if role == "B":
            groups["b_no_decay" if name in undecayed else "b"].append(param)
        else:
            groups["a" if role == "A" else "embedding"].append(param)
    b_lr = lr * loraplus_lr_ratio
    settings = {
        "a": {"lr": lr, "weight_decay": weight_decay},
        "embedding": {"lr": embedding_lr, "weight_decay": weight_decay},
        "b": {"lr": b_lr, "weight_decay": weight_decay},
        "b_no_decay": {"lr": b_lr, "weight_decay": 0.0},
    }
    # all four groups, empty ones too, in peft's order (so optimizer states line up with peft's)
    param_groups = [{"params": ps, **settings[k]} for k, ps in groups.items()]
    return optimizer_cls(param_groups, lr=lr, **kwargs)


def loraplus_roles(model: nn.Module) -> list[tuple[str, nn.Parameter, str]]:
    """(name, parameter, role) for every trainable parameter; role 'A', 'B' or 'embedding' (see
    the module docstring). `ConfigError` when nothing trains."""
    roles = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if ".lora_embedding_" in name:
            roles.append((name, param, "embedding"))
        elif ".lora_B." in name or param.ndim == 1:
            roles.append((name, param, "B"))
        else:
            roles.append((name, param, "A"))
    if not roles:
        raise ConfigError("the model has no trainable parameters; add an adapter or unfreeze some")
    return roles


def _undecayed_names(model: nn.Module) -> set[str]:
    """Names with "bias" in them and the parameters of `nn.LayerNorm` layers."""
    names = set()
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, nn.LayerNorm) or "bias" in full:
                names.add(full)
    return names
