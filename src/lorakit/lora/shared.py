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

On the CPU the mask is drawn by `keep_mask`: 32 random bits per element, 64 at a time,
compared with a threshold. torch's own dropout draws a float per element with `bernoulli_`,
which is ~2.5x slower here and was 17% of a training step's time with dropout 0.05
(docs/benchmarks.md); the keep probability is exact to 2^-32 (float32 `bernoulli_`'s is to
2^-24). torch's CPU generator is serial, so a large mask is drawn in two halves at once, on
this thread and on a helper thread, from two generators seeded by two draws of torch's default
generator: the masks still follow from its state alone. The mask is kept for backward as
bytes, a quarter of the float mask's memory; the 1/(1-p) is left to the caller's scaling. On
other devices torch's fused dropout runs.

Inside `torch.compile` (train.compile) each layer runs torch's dropout, whose random numbers
inductor draws inside the kernel that applies them: no record is kept, and each adapter layer
draws its own mask (peft's rule), still from torch's default generator.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

_BITS = 2**32  # the resolution of the keep probability
_SPLIT_WORDS = 2**16  # 64-bit draws from which a mask is drawn in two halves at once


class _Record(threading.local):
    """The last input a dropout was drawn on, per thread, and the layers that used it."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.x: weakref.ref | None = None
        self.key: tuple | None = None
        self.dropped: tuple[torch.Tensor, float] | None = None
        self.layers: list[Any] = []


_record = _Record()


def clear() -> None:
    """Forget the last input (after a forward), so its tensors are released."""
    _record.reset()


def dropout_rate(dropout: nn.Module) -> float:
    """The rate a layer's dropout applies now (0 in eval mode or for nn.Identity)."""
    return float(dropout.p) if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


def dropped(layer: nn.Module, x: torch.Tensor, name: str) -> tuple[torch.Tensor, float]:
    """Adapter `name`'s dropout on `x` as (masked, factor), dropout(x) = factor * masked: the
    mask the layer before it drew on this same tensor at the same rate, else a new one.

    On the CPU `masked` is x with the dropped elements zeroed and `factor` is 1 / (1 - rate), for
    the caller to fold into its scaling (a pass over the tensor saved, forward and backward);
    elsewhere `masked` is torch's dropout(x) and `factor` 1.
    """
    dropout = layer.lora_dropout[name]
    rate = dropout_rate(dropout)
    if not rate:
        return x, 1.0
    if torch.compiler.is_compiling():  # inductor fuses its own mask with the multiply
        return dropout(x), 1.0
    key = (name, rate, x._version, torch.is_grad_enabled())
    rec = _record
    if rec.x is not None and rec.x() is x and rec.key == key and layer not in rec.layers:
        rec.layers.append(layer)
        return rec.dropped
    if x.device.type == "cpu" and rate < 1:
        out = _Masked.apply(x, rate), 1.0 / (1.0 - rate)
    else:
        out = dropout(x), 1.0
    rec.x, rec.key, rec.dropped, rec.layers = weakref.ref(x), key, out, [layer]
    return out


def keep_mask(shape: torch.Size | tuple[int, ...], rate: float, device=None) -> torch.Tensor:
    """A boolean mask, True with probability 1 - rate (to 2^-32) independently per element,
    drawn from torch's default generator: each element compares 32 random bits (half of one
    64-bit draw) with round(rate * 2^32)."""
    threshold = round(rate * _BITS)
    if threshold >= _BITS:  # a rate within 2^-33 of 1 drops everything
        return torch.zeros(shape, dtype=torch.bool, device=device)
    count = math.prod(shape)
    words = _random_words((count + 1) // 2, device)
    draws = words.view(torch.int32)[:count].view(shape)  # 32 random bits each
    return draws >= threshold - 2**31


class _Helper(threading.local):
    """Per thread: two generators for the halves of a mask, and the buffer the random words
    are drawn into (reused: a fresh one per mask is ~4 bytes of new memory per element, whose
    page faults cost as much as the drawing)."""

    def __init__(self) -> None:
        self.generators = (torch.Generator(), torch.Generator())
        self.words = torch.empty(0, dtype=torch.int64)


_helper = _Helper()
_pool: tuple[int, ThreadPoolExecutor] | None = None  # (pid, the thread drawing second halves)


def _random_words(count: int, device) -> torch.Tensor:
    """`count` uniformly random 64-bit integers, following from torch's default generator; on
    the CPU in this thread's buffer, valid until its next call."""
    if torch.device(device or "cpu").type != "cpu":
        return torch.empty(count, dtype=torch.int64, device=device).random_(-(2**63), None)
    if _helper.words.numel() < count:
        _helper.words = torch.empty(count, dtype=torch.int64)
    words = _helper.words[:count]
    if count < _SPLIT_WORDS:
        return words.random_(-(2**63), None)
    global _pool
    if _pool is None or _pool[0] != os.getpid():  # a forked child has no helper thread
        _pool = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="lorakit-dropout"))
    seeds = torch.empty(2, dtype=torch.int64).random_(0, 2**62).tolist()
    first, second = _helper.generators
    first.manual_seed(seeds[0])
    second.manual_seed(seeds[1])
    half = count // 2
    done = _pool[1].submit(words[half:].random_, -(2**63), None, generator=second)
    words[:half].random_(-(2**63), None, generator=first)
    done.result()
    return words


class _Masked(torch.autograd.Function):
    """x with a `keep_mask` at `rate` applied (no rescaling); the mask saved as bytes (0 / 1)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rate: float) -> torch.Tensor:
        keep = keep_mask(x.shape, rate, x.device).view(torch.uint8)  # x * uint8: 2x x * bool
        ctx.save_for_backward(keep)
        return x.mul(keep)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep), None
