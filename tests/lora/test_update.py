"""The LoRA update dW = scaling · B A and merging it, written out (`lorakit.lora.update`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit.lora import update
from lorakit.lora.layers import LoraLinear


def _layer() -> LoraLinear:
    """A linear layer with plain adapters a (r=2, alpha=4) and b (r=3, alpha=3), both random."""
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(5, 4))
    layer.update_layer("a", 2, 4, init_lora_weights=False)
    layer.update_layer("b", 3, 3, init_lora_weights=False)
    return layer


def _dw(layer: LoraLinear, name: str, scaling: float) -> torch.Tensor:
    a, b = layer.lora_weights(name)
    return scaling * b.detach() @ a.detach()


def test_scaled_update_is_scaling_times_b_at_a():
    layer = _layer()
    torch.testing.assert_close(update.scaled_update(layer, "a"), _dw(layer, "a", 4 / 2))
    torch.testing.assert_close(update.scaled_update(layer, "b"), _dw(layer, "b", 3 / 3))
    assert update.lora_weight(layer, "b", torch.float64).dtype == torch.float64


def test_merged_weight_adds_each_update_and_unmerged_weight_takes_them_out():
    layer = _layer()
    w = torch.randn(4, 5)
    merged, norms = update.merged_weight(layer, ["a", "b"], w)
    assert norms == {}  # no DoRA adapter
    torch.testing.assert_close(merged, w + _dw(layer, "a", 2.0) + _dw(layer, "b", 1.0))
    torch.testing.assert_close(update.unmerged_weight(layer, ["b", "a"], merged), w)


def test_safe_merge_refuses_a_non_finite_result():
    layer = _layer()
    with pytest.raises(ValueError, match="merging adapter `a` produced non-finite weights"):
        update.merged_weight(layer, ["a"], torch.full((4, 5), float("inf")), safe_merge=True)
