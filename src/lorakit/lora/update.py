"""The LoRA update and merging it into the base weight.

For a base weight W (out × in) and an adapter with A (r × in), B (out × r), the update is

    dW = scaling * B @ A,    scaling = lora_alpha / r   (lora_alpha / sqrt(r) with rslora)

Merging adds dW to W; unmerging subtracts it. A DoRA adapter (`dora.py`) instead maps W to
(m / n) * (W + dW) when merged, and back when unmerged. Here every weight is (out, in), in fp32;
`LoraLinear` converts to and from its base's layout and dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.lora import dora


def lora_weight(layer: nn.Module, name: str, dtype: torch.dtype) -> torch.Tensor:
    """B @ A (out, in) in `dtype`, without the scaling."""
    a, b = layer.lora_weights(name)
    # flatten(1): a convolution's A (r, in, *k) and B (out, r, 1, ...) as matrices (`conv.py`)
    return (b.flatten(1) @ a.flatten(1)).to(dtype)


def scaled_update(layer: nn.Module, name: str) -> torch.Tensor:
    """dW = scaling * B @ A as (out, in), fp32."""
    return lora_weight(layer, name, torch.float32) * layer.scaling[name]


@torch.no_grad()
def merged_weight(
    layer: nn.Module, names: list[str], unmerged: torch.Tensor, safe_merge: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(W with `names` merged in order, {DoRA adapter: its n}), (out, in) fp32.

    A plain adapter adds dW; a DoRA adapter maps W_now to (m / n) * (W_now + dW), with n the
    row norms of `unmerged` + dW."""
    merged, norms = unmerged, {}
    for name in names:
        delta = scaled_update(layer, name)
        if name in layer.lora_magnitude_vector:
            merged, norms[name] = dora.merge_step(layer, name, merged, unmerged, delta)
        else:
            merged = merged + delta
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"merging adapter `{name}` produced non-finite weights; not merged")
    return merged, norms


@torch.no_grad()
def unmerged_weight(layer: nn.Module, names: list[str], weight: torch.Tensor) -> torch.Tensor:
    """`weight` (out, in) fp32 with `names` (newest first) taken out: the inverse of
    `merged_weight`, with each DoRA adapter's n as kept at merge time."""
    for name in names:
        delta = scaled_update(layer, name)
        if name in layer.lora_magnitude_vector:
            weight = dora.unmerge_step(layer, name, weight)
        weight = weight - delta
    return weight
