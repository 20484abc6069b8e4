"""The decode batch's KV cache: rows left-padded to one length, trimmed when rows leave, and
layers that grow in place."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from lorakit.serve.kvcache import BatchCache


def test_batch_cache_pads_left_and_trims():
    from transformers import DynamicCache

    def solo(length, fill):
        keys = torch.full((1, 2, length, 4), float(fill))
        return DynamicCache(ddp_cache_data=[(keys, keys.clone())]), torch.ones(1, length).long()

    batch = BatchCache()
    batch.add(*solo(3, 1))
    batch.add(*solo(5, 2))
    assert batch.mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert batch.cache.layers[0].keys[0, 0, :, 0].tolist() == [0, 0, 1, 1, 1]
    batch.keep([0])  # the long row leaves: its padding goes too
    assert batch.mask.tolist() == [[1, 1, 1]]
    assert batch.cache.layers[0].keys.shape == (1, 2, 3, 4)
    # a decode step writes into the spare room in place; past the room the buffers grow
    layer = batch.cache.layers[0]
    for step in range(100):
        assert batch.step_mask().shape == (1, 4 + step)
        new = torch.full((1, 2, 1, 4), float(10 + step))
        keys, values = layer.update(new, new.clone())
    assert keys.shape == (1, 2, 103, 4) and values.shape == (1, 2, 103, 4)
    assert keys[0, 0, :, 0].tolist() == [1.0] * 3 + [float(10 + s) for s in range(100)]
    # rows of a padded prefill batch join, chosen by index
    two = torch.arange(2 * 2 * 4 * 4, dtype=torch.float).view(2, 2, 4, 4)
    prefill = DynamicCache(ddp_cache_data=[(two, two.clone())])
    batch.add(prefill, torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), [1])
    assert batch.mask.shape == (2, 103) and batch.mask[1].tolist() == [0] * 99 + [1] * 4
    assert torch.equal(batch.cache.layers[0].keys[1, :, -4:], two[1])


def test_keeping_no_row_empties_the_batch():
    batch = BatchCache()
    assert batch.rows == 0
    batch.keep([0])  # nothing to keep yet: no change
    assert batch.cache is None and batch.mask is None
    keys = torch.ones(3, 2, 4, 4)
    batch.add(DynamicCache(ddp_cache_data=[(keys, keys.clone())]), torch.ones(3, 4).long())
    assert batch.rows == 3
    batch.keep([2, 0])  # rows in this order
    assert batch.rows == 2 and batch.cache.layers[0].keys.shape == (2, 2, 4, 4)
    batch.keep([])
    assert batch.rows == 0 and batch.cache is None and batch.mask is None


def test_a_cache_without_layers_cannot_be_batched():
    with pytest.raises(RuntimeError, match="cannot batch"):
        BatchCache().add(DynamicCache(), torch.ones(1, 3).long())
