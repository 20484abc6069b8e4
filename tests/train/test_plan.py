"""Which rows each rank trains on at each optimizer step (lorakit.train.plan), for pre-collated
batches: the epoch order, steps per epoch, a step's data position, the rows of each rank.
(Two real processes training as one: test_ddp.py.)"""

from __future__ import annotations

import pytest
import torch

from lorakit.errors import DataError
from lorakit.train.plan import StepPlan, epoch_order, eval_batches, rank_rows, sample_ids
from lorakit.train.runtime import Dist


def batches(n: int, rows: int = 4) -> list[dict]:
    """n collated batches; every token of batch i is i, sample ids run on over the batches."""
    return [
        {
            "input_ids": torch.full((rows, 3), i),
            "labels": torch.full((rows, 3), i),
            "sample_ids": list(range(i * rows, (i + 1) * rows)),
        }
        for i in range(n)
    ]


def test_epoch_order_is_a_seeded_permutation_per_epoch():
    assert epoch_order(5, seed=0, epoch=0, shuffle=False) == [0, 1, 2, 3, 4]
    first = epoch_order(8, seed=1, epoch=0, shuffle=True)
    assert sorted(first) == list(range(8))
    assert epoch_order(8, seed=1, epoch=0, shuffle=True) == first  # same seed and epoch
    assert epoch_order(8, seed=1, epoch=1, shuffle=True) != first  # each epoch its own order


def test_rank_rows_split_a_micro_batch_contiguously_and_near_equally():
    # 5 rows over 2 ranks: numpy's array_split gives the first rank the extra row, [0:3], [3:5]
    assert [rank_rows(5, Dist(rank=r, world_size=2)) for r in (0, 1)] == [
        slice(0, 3),
        slice(3, 5),
    ]
    # 2 rows over 3 ranks: the last rank gets none
    assert rank_rows(2, Dist(rank=2, world_size=3)) == slice(0, 0)
    assert rank_rows(4, Dist()) == slice(0, 4)  # one process takes every row


def test_steps_locate_their_micro_batches_across_epochs():
    # 5 batches, 2 per step: steps of [0, 1], [2, 3], [4] per epoch, so 3 a epoch
    plan = StepPlan(batches(5), batch_size=4, grad_accum_steps=2, seed=0, shuffle=False)
    assert plan.steps_in_epoch(0) == 3 and plan.total_steps(2) == 6
    assert [plan.locate(s) for s in range(6)] == [(0, 0), (0, 2), (0, 4), (1, 0), (1, 2), (1, 4)]
    step = plan.rank_batches(1, Dist())
    assert [int(b["input_ids"][0, 0]) for b in step] == [2, 3]
    last = plan.rank_batches(2, Dist())  # the epoch's short last step
    assert [int(b["input_ids"][0, 0]) for b in last] == [4]
    assert sample_ids(last) == [16, 17, 18, 19]


def test_each_rank_takes_its_rows_of_every_micro_batch():
    plan = StepPlan(batches(4), batch_size=4, grad_accum_steps=2, seed=0, shuffle=False)
    # step 1 holds batches 2 and 3 (sample ids 8..11, 12..15); 4 rows over 2 ranks: 2 each
    ids = [sample_ids(plan.rank_batches(1, Dist(rank=r, world_size=2))) for r in (0, 1)]
    assert ids == [[8, 9, 12, 13], [10, 11, 14, 15]]
    rows = plan.rank_batches(1, Dist(rank=1, world_size=2))
    assert [tuple(b["input_ids"].shape) for b in rows] == [(2, 3), (2, 3)]
    # 4 rows over 8 ranks: ranks 4..7 have no rows, and empty micro-batches are dropped
    assert plan.rank_batches(1, Dist(rank=5, world_size=8)) == []


def test_sample_ids_read_lists_and_tensors_and_skip_batches_without_them():
    given = [{"sample_ids": [3, 4]}, {"sample_ids": torch.tensor([5])}, {"input_ids": None}]
    assert sample_ids(given) == [3, 4, 5]


def test_the_fingerprint_follows_the_tokens_and_the_batch_size():
    def fingerprint(data, batch_size=4):
        return StepPlan(data, batch_size, grad_accum_steps=1, seed=0, shuffle=True).fingerprint()

    same = fingerprint(batches(3))
    assert fingerprint(batches(3)) == same and len(same) == 16
    changed = batches(3)
    changed[1]["labels"][0, 0] = -100  # one label masked
    assert fingerprint(changed) != same
    assert fingerprint(batches(3), batch_size=8) != same


def test_empty_data_is_refused_and_plain_eval_data_passes_through():
    with pytest.raises(DataError, match="the training data is empty"):
        StepPlan([], batch_size=4, grad_accum_steps=1, seed=0, shuffle=True)
    data = batches(2)
    assert eval_batches(data, 4) is data and eval_batches(None, 4) is None
