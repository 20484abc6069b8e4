"""Batches: a deterministic plan per (seed, epoch), packing, length grouping, collation, DDP split.

A plan is `list[batch]`, a batch is `list[row]`, a row is `list[sample index]` (one sample when
unpacked, several when packed). The plan depends only on the sample lengths, the seed, the
epoch and the batch settings, so the data position (epoch, batch index) is enough to resume.

Packed rows hold several samples back to back; `position_ids` restart at 0 for each sample and
there is no `attention_mask`. transformers (>= 4.56, masking_utils) then builds a block-diagonal
causal mask from the position restarts for sdpa / eager attention, so no token attends across
samples, but only when the forward has no cache: pass `use_cache=False` (see `model_inputs`).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lorakit.data.tokenize import IGNORE_INDEX

_GROUP_CHUNK = 64  # length grouping sorts within chunks of this many global batches

Plan = list[list[list[int]]]


def _rng(seed: int, epoch: int) -> np.random.Generator:
    """The random generator of one epoch."""
    return np.random.default_rng([seed, epoch])


def pack_rows(lengths: Sequence[int], order: Sequence[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing: put samples (longest first) into the fullest row they fit in."""
    by_length = sorted(order, key=lambda i: -lengths[i])  # stable: ties keep the shuffled order
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row id), sorted
    for i in by_length:
        if lengths[i] > max_length:
            raise ValueError(f"sample {i} has {lengths[i]} tokens > max_length {max_length}")
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = max_length, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - lengths[i] > 0:
            bisect.insort(free, (room - lengths[i], row))
    return rows


def make_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    packing: bool = False,
    max_length: int = 2048,
    group_by_length: bool = False,
    shuffle: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> Plan:
    """This rank's batches for one epoch: each a list of rows, each row a list of sample indices.

    A global batch has batch_size * world_size rows; rank r takes its slice. When the last global
    batch is short, its rows are shared as evenly as possible, and it is dropped when some rank
    would get no row (every rank must take the same number of steps).
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad batch split: batch_size={batch_size}, rank={rank}/{world_size}")
    rng = _rng(seed, epoch)
    order = rng.permutation(len(lengths)).tolist() if shuffle else list(range(len(lengths)))
    per_step = batch_size * world_size
    if packing:
        rows = pack_rows(lengths, order, max_length)
        if shuffle:
            rows = [rows[i] for i in rng.permutation(len(rows))]
    elif group_by_length:
        rows = _grouped(order, lengths, per_step, rng if shuffle else None)
    else:
        rows = [[i] for i in order]
    plan = []
    for start in range(0, len(rows), per_step):
        step = rows[start : start + per_step]
        if len(step) < world_size:
            break
        share = np.array_split(np.arange(len(step)), world_size)[rank]
        plan.append([step[j] for j in share])
    return plan


def _grouped(
    order: list[int], lengths: Sequence[int], per_step: int, rng: np.random.Generator | None
) -> list[list[int]]:
    """Rows (one sample each) sorted by length within chunks, global batches then shuffled."""
    chunk = per_step * _GROUP_CHUNK
    rows: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: -lengths[i])
        rows += [[i] for i in part]
    steps = [rows[s : s + per_step] for s in range(0, len(rows), per_step)]
    if rng is not None and len(steps) > 1:
        # keep a short last batch last, so every other global batch stays full
        full = steps[:-1] if len(steps[-1]) < per_step else steps
        perm = rng.permutation(len(full)).tolist()
        steps = [full[i] for i in perm] + steps[len(full) :]
    return [row for step in steps for row in step]


def collate(
    samples: Sequence[Any], rows: list[list[int]], pad_token_id: int, packed: bool
) -> dict[str, Any]:
    """One batch of tensors from rows of sample indices (samples have .input_ids and .labels)."""
    input_ids, labels, positions = [], [], []
    for row in rows:
        input_ids.append([t for i in row for t in samples[i].input_ids])
        labels.append([t for i in row for t in samples[i].labels])
        positions.append([p for i in row for p in range(len(samples[i].input_ids))])
    width = max(len(ids) for ids in input_ids)
    lengths = [len(ids) for ids in input_ids]
    for ids, lab, pos in zip(input_ids, labels, positions, strict=True):
        pad = width - len(ids)
        ids += [pad_token_id] * pad
        lab += [IGNORE_INDEX] * pad
        # padding of a packed row is one more "sample" of its own; unpadded rows are masked
        pos += list(range(pad)) if packed else list(range(len(pos), len(pos) + pad))
    batch: dict[str, Any] = {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),  # (B, T)
        "labels": torch.tensor(labels, dtype=torch.long),  # (B, T)
        "position_ids": torch.tensor(positions, dtype=torch.long),  # (B, T)
        "attention_mask": None,
        "sample_ids": [list(row) for row in rows],
    }
    if not packed:
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, n in enumerate(lengths):
            mask[b, :n] = 1
        batch["attention_mask"] = mask  # (B, T)
    return batch


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments for `model(**...)`: tensors plus use_cache=False (packing needs it)."""
    inputs = {
        "input_ids": batch["input_ids"],
        "position_ids": batch["position_ids"],
        "labels": batch["labels"],
        "use_cache": False,
    }
    if batch.get("attention_mask") is not None:
        inputs["attention_mask"] = batch["attention_mask"]
    return inputs


def padding_share(samples: Sequence[Any], plan: Plan) -> float:
    """Share of batch positions that are padding over a whole plan."""
    real = total = 0
    for rows in plan:
        lengths = [sum(len(samples[i].input_ids) for i in row) for row in rows]
        real += sum(lengths)
        total += max(lengths) * len(lengths)
    return 1.0 - real / total if total else 0.0
