"""Adapter layers that read one tensor share one dropout mask on it.

In a decoder block q_proj, k_proj and v_proj read the same hidden states, and gate_proj and
up_proj read the same normalised input. When adapter layers with the same dropout rate run one
after another on the same tensor (the same object, not modified in between), they share one
dropped copy of it, as the original LoRA implementation's shared input dropout does; peft draws
a mask per layer. Each layer's A still sees dropout at its rate on every element, so each layer
alone is unchanged in distribution; what changes is that q, k and v (and gate and up) drop the
same input features together. The cost of dropout falls from one mask per adapted layer to one
per distinct input.

A layer called twice with one tensor draws a new mask, so a second forward on the same input is
a new sample. The masks come from the same random stream in the same order on every run, so
activation checkpointing's re-run and a resumed run draw what the original did. The record of
the last tensor is per thread; `clear()` drops it (LoraModel calls it after every forward).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from torch import nn


class _Record(threading.local):
    """The last input a dropout was drawn on, per thread, and the layers that used it."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.x: weakref.ref | None = None
        self.key: tuple | None = None
        self.dropped: torch.Tensor | None = None
        self.layers: list[Any] = []


_record = _Record()


def clear() -> None:
    """Forget the last input (after a forward), so its tensors are released."""
    _record.reset()


def dropout_rate(dropout: nn.Module) -> float:
    """The rate a layer's dropout applies now (0 in eval mode or for nn.Identity)."""
    return float(dropout.p) if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


def dropped(layer: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
    """dropout(x) for adapter `name` of `layer`: the mask the layer before it drew on this same
    tensor at the same rate, else a new one."""
    dropout = layer.lora_dropout[name]
    rate = dropout_rate(dropout)
    if not rate:
        return x
    key = (name, rate, x._version, torch.is_grad_enabled())
    rec = _record
    if rec.x is not None and rec.x() is x and rec.key == key and layer not in rec.layers:
        rec.layers.append(layer)
        return rec.dropped
    out = dropout(x)
    rec.x, rec.key, rec.dropped, rec.layers = weakref.ref(x), key, out, [layer]
    return out
