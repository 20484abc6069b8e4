"""The data side of the loop: which rows each rank trains on at each optimizer step.

The data is a sequence of global micro-batches per epoch, either pre-collated batches (dicts of
tensors) in a seeded per-epoch order, or a `lorakit.data.TokenizedDataset` planned by
`lorakit.data.plan_epoch` (length grouping, packing). Optimizer step s takes global
micro-batches [i * A, (i + 1) * A) of epoch e, where (e, i) is the data position of s and A is
grad_accum_steps; under torchrun rank r takes its share of each micro-batch's rows. So the
global batch never depends on the number of processes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lorakit.errors import DataError
from lorakit.train.runtime import Dist


def epoch_order(n_batches: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Batch order of one epoch: a permutation seeded by (seed, epoch), or 0..n-1."""
    if not shuffle:
        return list(range(n_batches))
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n_batches, generator=generator).tolist()


def rank_rows(n_rows: int, ctx: Dist) -> slice:
    """The rows of a global micro-batch that rank `ctx.rank` takes (contiguous, near-equal)."""
    bounds = np.array_split(np.arange(n_rows), ctx.world_size)[ctx.rank]
    return slice(int(bounds[0]), int(bounds[-1]) + 1) if len(bounds) else slice(0, 0)


def slice_batch(batch: dict[str, Any], rows: slice) -> dict[str, Any]:
    """The given rows of a collated batch (tensors and per-row lists)."""
    out = {}
    for key, value in batch.items():
        out[key] = value[rows] if isinstance(value, torch.Tensor | list) else value
    return out


def _is_tokenized_dataset(data: Any) -> bool:
    return hasattr(data, "samples") and hasattr(data, "lengths") and hasattr(data, "config")


class StepPlan:
    """Maps optimizer steps to data positions and to this rank's micro-batches."""

    def __init__(
        self, data: Any, batch_size: int, grad_accum_steps: int, seed: int, shuffle: bool
    ) -> None:
        self.data, self.batch_size, self.accum = data, batch_size, grad_accum_steps
        self.seed, self.shuffle = seed, shuffle
        self.tokenized = _is_tokenized_dataset(data)
        self._plans: dict[int, list] = {}
        self._lengths: dict[int, int] = {}
        if len(data) == 0:
            raise DataError("the training data is empty")

    def _epoch(self, epoch: int) -> list:
        """Global micro-batches of an epoch: batch indices, or rows of sample indices."""
        if epoch not in self._plans:
            if self.tokenized:
                from lorakit.data.pipeline import plan_epoch

                plan = plan_epoch(
                    self.data, self.batch_size, seed=self.seed, epoch=epoch, shuffle=self.shuffle
                )
            else:
                plan = epoch_order(len(self.data), self.seed, epoch, self.shuffle)
            if not plan:
                raise DataError(f"epoch {epoch} has no batches; lower batch_size")
            self._plans = {epoch: plan}  # keep one epoch: plans of big datasets are lists
        return self._plans[epoch]

    def steps_in_epoch(self, epoch: int) -> int:
        """Optimizer steps of one epoch (the last one may have fewer micro-batches)."""
        if epoch not in self._lengths:
            self._lengths[epoch] = len(self._epoch(epoch))
        return math.ceil(self._lengths[epoch] / self.accum)

    def total_steps(self, epochs: int) -> int:
        """Optimizer steps of `epochs` passes over the data."""
        return sum(self.steps_in_epoch(e) for e in range(epochs))

    def locate(self, step: int) -> tuple[int, int]:
        """Data position (epoch, micro-batch index) where optimizer step `step` starts."""
        epoch = 0
        while step >= (n := self.steps_in_epoch(epoch)):
            step -= n
            epoch += 1
        return epoch, step * self.accum

    def rank_batches(self, step: int, ctx: Dist) -> list[dict[str, Any]]:
        """This rank's micro-batches of optimizer step `step` (0-based); empty ones dropped."""
        epoch, start = self.locate(step)
        out = []
        for item in self._epoch(epoch)[start : start + self.accum]:
            if self.tokenized:
                from lorakit.data.pipeline import collate_batch

                rows = item[rank_rows(len(item), ctx)]
                batch = collate_batch(self.data, rows) if rows else None
            else:
                batch = self.data[item]
                batch = slice_batch(batch, rank_rows(len(batch["input_ids"]), ctx))
            if batch is not None and len(batch["input_ids"]) > 0:
                out.append(batch)
        return out

    def describe(self, ids: list[Any]) -> str:
        """Sample ids, with their file rows when the data knows them."""
        if self.tokenized and ids:
            return f"{ids} ({self.data.describe(ids)})"
        return str(ids)

    def fingerprint(self, per_sample: bool = False) -> str:
        """sha256 over the batching settings and the data: changes with the data. A token store
        gives the digest it kept when written (O(1) at any size); `per_sample` hashes every
        sample's ids and labels instead, the fingerprint of runs begun before stores kept one."""
        digest = hashlib.sha256(f"{self.batch_size}".encode())
        if self.tokenized:
            cfg = self.data.config
            digest.update(f"{cfg.packing}/{cfg.max_length}/{cfg.group_by_length}".encode())
            samples = self.data.samples
            content = None if per_sample else getattr(samples, "content_digest", lambda: None)()
            if content is not None:
                digest.update(f"store:{content}".encode())
                return digest.hexdigest()[:16]
            pairs = (
                samples.iter_arrays()  # a token store: read as arrays, no lists made
                if hasattr(samples, "iter_arrays")
                else ((s.input_ids, s.labels) for s in samples)
            )
            for ids, labels in pairs:
                digest.update(np.asarray(ids, dtype=np.int64).tobytes())
                digest.update(np.asarray(labels, dtype=np.int64).tobytes())
            return digest.hexdigest()[:16]
        for batch in self.data:
            for key in ("input_ids", "labels", "position_ids"):
                if batch.get(key) is not None:
                    digest.update(key.encode())
                    digest.update(torch.as_tensor(batch[key]).cpu().numpy().tobytes())
        return digest.hexdigest()[:16]


def eval_batches(data: Any, batch_size: int) -> Sequence[dict[str, Any]] | Any:
    """Eval data as an iterable of collated batches (a tokenized dataset is planned unshuffled)."""
    if data is None or not _is_tokenized_dataset(data):
        return data
    from lorakit.data.pipeline import collate_batch, plan_epoch

    plan = plan_epoch(data, batch_size, shuffle=False)
    return [collate_batch(data, rows) for rows in plan]


def sample_ids(batches: list[dict[str, Any]]) -> list[Any]:
    """Dataset row ids of the samples in these batches (when the data provides them)."""
    ids: list[Any] = []
    for batch in batches:
        value = batch.get("sample_ids")
        if value is not None:
            ids.extend(value.tolist() if isinstance(value, torch.Tensor) else list(value))
    return ids
