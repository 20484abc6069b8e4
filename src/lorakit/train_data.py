"""The data side of the loop: per-epoch batch order, each rank's micro-batches of a step, a
fingerprint of the data for resume checks."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import torch

from lorakit.train_runtime import Dist


def data_fingerprint(batches: Sequence[dict[str, Any]]) -> str:
    """sha256 over the token ids and labels of every batch: changes when the data does."""
    digest = hashlib.sha256()
    for batch in batches:
        for key in ("input_ids", "labels", "position_ids"):
            if key in batch:
                digest.update(key.encode())
                digest.update(torch.as_tensor(batch[key]).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def epoch_order(n_batches: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Batch order of one epoch: a permutation seeded by (seed, epoch), or 0..n-1."""
    if not shuffle:
        return list(range(n_batches))
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n_batches, generator=generator).tolist()


def step_batches(
    data: Sequence[dict[str, Any]],
    step: int,
    grad_accum_steps: int,
    seed: int,
    shuffle: bool,
    ctx: Dist,
) -> list[dict[str, Any]]:
    """This rank's micro-batches of optimizer step `step` (0-based): data position
    (epoch, batch index) = divmod(step, steps per epoch), then every world_size-th batch."""
    per_epoch = math.ceil(len(data) / grad_accum_steps)
    epoch, index = divmod(step, per_epoch)
    order = epoch_order(len(data), seed, epoch, shuffle)
    start = index * grad_accum_steps
    chosen = order[start : start + grad_accum_steps]
    return [data[i] for j, i in enumerate(chosen) if j % ctx.world_size == ctx.rank]


def sample_ids(batches: list[dict[str, Any]]) -> list[Any]:
    """Dataset row ids of the samples in these batches (when the data provides them)."""
    ids: list[Any] = []
    for batch in batches:
        value = batch.get("sample_ids")
        if value is not None:
            ids.extend(value.tolist() if isinstance(value, torch.Tensor) else list(value))
    return ids
