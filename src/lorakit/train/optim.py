"""AdamW (fp32 moments, or 8-bit ones: `optim8bit`) over trainable parameters and the
learning-rate schedule.

Schedule, with w warmup steps out of T total and step s counted from 0:

    s < w:   lr * (s + 1) / (w + 1)
    after:   lr * f(p),  p = (s - w) / max(1, T - w)
             cosine  f = m + (1 - m) * (1 + cos(pi p)) / 2
             linear  f = m + (1 - m) * (1 - p)
             constant f = 1
    with m = min_lr_ratio.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorakit.lora.compat.loraplus import loraplus_roles
from lorakit.train.config import TrainConfig


def build_optimizer(
    model: nn.Module, config: TrainConfig
) -> tuple[torch.optim.Optimizer, list[nn.Parameter]]:
    """AdamW over the trainable parameters, as `config` says (lr, weight_decay, betas, eps,
    lora_b_lr, optimizer); returns it and the parameters in a fixed order. config.optimizer:
    'adamw' (torch's, fp32 moments) or 'adamw_8bit' (`optim8bit.AdamW8bit`).

    Groups: decayed matrices, undecayed vectors (biases, norms), and, when `lora_b_lr` is set
    (LoRA+), the same two for the parameters LoRA+ puts at `lora_b_lr`: lora_B matrices and every
    1-D tensor (`lora.compat.loraplus.loraplus_roles`, the rule peft's LoRA+ uses).
    """
    lr, weight_decay, lora_b_lr = config.lr, config.weight_decay, config.lora_b_lr
    betas, eps, optimizer = config.betas, config.eps, config.optimizer
    decay, no_decay, b_decay, b_no_decay = [], [], [], []
    for _, p, role in loraplus_roles(model):
        at_b_lr = lora_b_lr is not None and role == "B"
        if p.ndim >= 2:
            (b_decay if at_b_lr else decay).append(p)
        else:
            (b_no_decay if at_b_lr else no_decay).append(p)
    b_lr = lr if lora_b_lr is None else lora_b_lr
    groups = [
        {"params": decay, "weight_decay": weight_decay, "base_lr": lr},
        {"params": no_decay, "weight_decay": 0.0, "base_lr": lr},
        {"params": b_decay, "weight_decay": weight_decay, "base_lr": b_lr},
        {"params": b_no_decay, "weight_decay": 0.0, "base_lr": b_lr},
    ]
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["lr"] = g["base_lr"]
    if optimizer == "adamw":
        built = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)
    elif optimizer == "adamw_8bit":
        from lorakit.train.optim8bit import AdamW8bit  # imports bitsandbytes, only when asked

        built = AdamW8bit(groups, lr=lr, betas=betas, eps=eps)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; use adamw or adamw_8bit")
    return built, [p for g in groups for p in g["params"]]


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors, each storage counted once."""
    seen: dict[tuple, int] = {}
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                seen[(value.device, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def lr_factor(step: int, total: int, warmup: int, kind: str, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif kind == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"unknown schedule {kind!r}; use cosine, linear or constant")
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def warmup_steps(total: int, steps: int, ratio: float) -> int:
    """Warmup length: explicit steps when given, else ratio of the total."""
    return steps if steps > 0 else int(math.ceil(ratio * total))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Set every group's lr to base_lr * factor; returns the first group's lr."""
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor
    return optimizer.param_groups[0]["lr"]
