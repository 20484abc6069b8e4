"""DoRA, weight-decomposed LoRA: a trained magnitude per output row times a normalised direction.

For a base weight W (out × in) and the adapter's update dW = scaling * B @ A, the effective weight

    W' = m * (W + dW) / n,    n = ||W + dW|| per output row,   m (out,): `lora_magnitude_vector`

with m starting at n, so W' = W before training. n is a constant for the backward pass (detached,
as the DoRA paper's section 4.3 advises), so A and B get gradients through dW x only. Added to the
base output y = x W^T + b, the forward is

    (m / n - 1) * (y - b) + (m / n) * scaling * B(A(x))

except while training with LoRA dropout: then both terms see the dropped input, (y - b) becoming
dropout(x) W^T. Merging writes (m / n) * (W_now + dW) into the base weight, where W_now holds the
adapters merged before and n always comes from the unmerged W; unmerging divides by m / n, with n
kept from the merge. `cached_weight_norms(model)` keeps n per layer during inference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def weight_norm(layer: nn.Module, name: str, weight: torch.Tensor) -> torch.Tensor:
    """n = ||W + scaling * B @ A|| per output row (out,), detached; `weight` is W (out, in)."""
    cache = layer.dora_norm_cache
    if cache is not None and not layer.training and name in cache:
        return cache[name]
    a, b = layer.lora_weights(name)
    update = (b @ a).to(weight.dtype).detach()  # B @ A, as `update.lora_weight`
    norm = torch.linalg.norm(weight.detach() + layer.scaling[name] * update, dim=1)
    norm = norm.to(weight.dtype)
    if cache is not None and not layer.training:
        cache[name] = norm
    return norm


@torch.no_grad()
def initial_magnitude(layer: nn.Module, name: str) -> torch.Tensor:
    """m at creation: the row norms of the current W + dW, in the adapter's dtype."""
    a, _ = layer.lora_weights(name)
    weight = layer.dense_weight().to(a.device)
    compute = torch.promote_types(weight.dtype, a.dtype)
    if compute in (torch.float16, torch.bfloat16):
        compute = torch.float32  # half-precision norms on the CPU lose too much
    return weight_norm(layer, name, weight.to(compute)).to(a.dtype).clone()


def dora_delta(layer: nn.Module, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
    """What DoRA adds to the base output `result` for input `x`, in the adapter's dtype."""
    a, b = layer.lora_weights(name)
    dropout = layer.lora_dropout[name]
    x = x.to(a.dtype)
    weight = layer.dense_weight().to(x.dtype)  # (out, in)
    scale = layer.lora_magnitude_vector[name] / weight_norm(layer, name, weight)  # (out,)
    if isinstance(dropout, nn.Identity) or not layer.training:
        bias = getattr(layer.base_layer, "bias", None)
        base = result if bias is None else result - bias
        base = base.to(x.dtype)
    else:
        x = dropout(x)
        base = F.linear(x, weight)
    lora = F.linear(F.linear(x, a), b)  # (..., out)
    return (scale - 1) * base + scale * lora * layer.scaling[name]


def merge_step(
    layer: nn.Module,
    name: str,
    merged: torch.Tensor,
    unmerged: torch.Tensor,
    delta: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """((m / n) * (W_now + dW), n) for merging DoRA adapter `name` into `merged` (W_now), n the
    row norms of `unmerged` + dW; all (out, in) fp32 (`update.merged_weight` calls this)."""
    norm = torch.linalg.norm(unmerged + delta, dim=1)
    factor = layer.lora_magnitude_vector[name].float().flatten() / norm  # conv: (1, out, 1..)
    return factor[:, None] * (merged + delta), norm


def unmerge_step(layer: nn.Module, name: str, weight: torch.Tensor) -> torch.Tensor:
    """`weight` divided by m / n, n as kept at merge time; what remains is W_now + dW."""
    norm = layer.dora_merged_norms.pop(name)
    return weight * (norm / layer.lora_magnitude_vector[name].float().flatten())[:, None]


@contextlib.contextmanager
def cached_weight_norms(model: nn.Module) -> Iterator[None]:
    """Within the context, DoRA layers in eval mode compute each adapter's n once and reuse it.

    For inference only: the weights must not change inside the context (the cache is dropped
    on exit, and never used by a layer in training mode).
    """
    layers = [m for m in model.modules() if hasattr(m, "dora_norm_cache")]
    for layer in layers:
        layer.dora_norm_cache = {}
    try:
        yield
    finally:
        for layer in layers:
            layer.dora_norm_cache = None
