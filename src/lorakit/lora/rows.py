"""Per-row adapters for one batch: row i of the batch uses adapter names[i], or none.

A `RowPlan` is built once per batch and read by every LoRA layer; with one set, a layer's
forward is `forward` here. A decode step may take its output from a fused group (`fused.py`);
otherwise the layer adds its LoRA to the base output in one of three ways:

- one adapter for every row: scaling * B(A(dropout(x))) as one addmm (`add_adapter`), in place
  into the base output when no autograd records it, nothing per row;
- grouped rows (works with autograd): per adapter, gather its rows, two small matmuls, add back
  (at inference, an adapter whose rows are one block adds into that block in place, no gather);
- packed adapters (inference only, from `PackedAdapters`): the loaded adapters' A and B side
  by side as A_cat (n·r, in) and B_cat (out, n·r), so that whatever the mix of adapters

      delta = ((x @ A_cat^T) * M) @ B_cat^T,   M (rows, n·r): a row's scaling on its own
                                              adapter's r columns, 0 elsewhere

  is two dense matmuls per layer instead of a gather, two matmuls and a scatter per adapter.
  Every token pays for all packed columns, so layers pack only for few tokens (a decode step,
  up to `lorakit.ops.FEW_ROWS`), and only over the column span from the first to the last
  adapter present in the batch; they use grouped rows when that span would be mostly waste.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.lora import shared
from lorakit.ops import FEW_ROWS, few_rows

BASE = "__base__"  # the per-row name meaning "no adapter"
_MIN_PACKED_SPAN = 64  # columns; below this a wasted column costs less than a grouped matmul


@dataclass(frozen=True)
class PackedLayer:
    """One layer's adapters packed side by side."""

    a: torch.Tensor  # (n·r, in), adapter i in rows starts[i] : starts[i] + r_i
    b: torch.Tensor  # (out, n·r), adapter i in columns starts[i] : starts[i] + r_i; the
    # transpose of a contiguous (n·r, out): a decode step's h @ B^T is ~1.7x faster that way
    blocks: tuple[tuple[str, int, int, float], ...]  # (adapter, start, r, scaling)


class PackedAdapters:
    """A snapshot of every packable LoRA layer's adapters, for inference batches.

    The weights are copies: build a new one after loading, deleting, merging or training
    adapters (`LoraModel.pack_adapters()`). Embedding LoRA and merged adapters are not packed;
    those layers use grouped rows.
    """

    def __init__(self, layers: list[nn.Module], adapters: list[str]) -> None:
        self._layers: dict[nn.Module, PackedLayer] = {}
        interned: dict[tuple, tuple] = {}  # layers with equal blocks share one tuple (one mask)
        for layer in layers:
            names = [name for name in adapters if name in layer.r]
            if not names or not layer.packable:
                continue
            a_parts, b_parts, blocks, start = [], [], [], 0
            for name in names:
                a, b = layer.lora_weights(name)
                a_parts.append(a.detach())
                b_parts.append(b.detach())
                blocks.append((name, start, layer.r[name], layer.scaling[name]))
                start += layer.r[name]
            blocks = interned.setdefault(tuple(blocks), tuple(blocks))
            self._layers[layer] = PackedLayer(
                torch.cat(a_parts).contiguous(), torch.cat(b_parts, 1).T.contiguous().T, blocks
            )

    def get(self, layer: nn.Module) -> PackedLayer | None:
        """The layer's packed adapters, or None when the layer is not packed."""
        return self._layers.get(layer)


class RowPlan:
    """Which adapter each row of one batch uses, in the forms the LoRA layers need."""

    def __init__(
        self,
        names: list[str | None],
        device: torch.device | None = None,
        packed: PackedAdapters | None = None,
        fused=None,
    ) -> None:
        self.names = [None if name in (None, BASE) else name for name in names]
        self.rows = len(self.names)
        self.groups: list[tuple[str, torch.Tensor, tuple[int, int] | None]] = []
        for name in dict.fromkeys(n for n in self.names if n is not None):
            rows = [i for i, n in enumerate(self.names) if n == name]
            block = (rows[0], rows[-1] + 1) if rows[-1] - rows[0] + 1 == len(rows) else None
            self.groups.append((name, torch.tensor(rows, dtype=torch.long, device=device), block))
        one_adapter = len(self.groups) == 1 and None not in self.names
        self.single = self.groups[0][0] if one_adapter else None  # every row, one adapter
        self.packed = packed
        self.fused = fused  # a lorakit.lora.fused.FusedDecode for decode steps, or None
        self.device = device
        self._layouts: dict[tuple, tuple[int, int, torch.Tensor] | None] = {}
        self._masks: dict[tuple, tuple[tuple, torch.Tensor]] = {}

    def packed_layout(
        self, layer: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(A span, B span, per-row scaling mask (rows, span)) for a packed layer, else None."""
        entry = None if self.packed is None else self.packed.get(layer)
        if entry is None:
            return None
        if entry.blocks not in self._layouts:  # layers with the same adapters share one mask
            self._layouts[entry.blocks] = self._layout(entry)
        layout = self._layouts[entry.blocks]
        if layout is None:
            return None
        lo, hi, mask = layout
        return entry.a[lo:hi], entry.b[:, lo:hi], mask

    def _layout(self, entry: PackedLayer) -> tuple[int, int, torch.Tensor] | None:
        present = [block for block in entry.blocks if block[0] in self.names]
        if not present:
            return None
        lo, hi = present[0][1], present[-1][1] + present[-1][2]
        used = sum(r for _, _, r, _ in present)
        if hi - lo > max(2 * used, _MIN_PACKED_SPAN):
            return None  # mostly adapters this batch does not use: grouped rows are cheaper
        return lo, hi, self._mask(present, lo, hi, entry.a.dtype, entry.a.device)

    def block_mask(self, blocks: tuple[tuple[str, int, int, float], ...], times: int = 1):
        """(rows, all of `blocks`' columns x `times`), fp32: each row's scaling on its own
        adapter's columns, 0 elsewhere (rows without an adapter in `blocks`: all 0)."""
        key = (id(blocks), times)  # hashing the blocks each call would cost more than the op
        # (PackedAdapters gives layers with equal blocks one tuple, so they share this mask)
        kept = self._masks.get(key)
        if kept is None or kept[0] is not blocks:
            total = blocks[-1][1] + blocks[-1][2]
            present = [block for block in blocks if block[0] in self.names]
            mask = self._mask(present, 0, total, torch.float32, self.device)
            kept = self._masks[key] = (blocks, mask.repeat(1, times))  # blocks kept: id unique
        return kept[1]

    def _mask(self, present, lo: int, hi: int, dtype, device) -> torch.Tensor:
        mask = torch.zeros(self.rows, hi - lo, dtype=dtype, device=device)
        for name, start, r, scaling in present:
            rows = [i for i, n in enumerate(self.names) if n == name]
            mask[rows, start - lo : start - lo + r] = scaling
        return mask


# ---------------------------------------------------------------- a layer's forward with a plan


def forward(layer: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """`layer`'s output with its plan's per-row adapters (adapters not disabled)."""
    plan = layer._rows
    if plan.fused is not None and not (args or kwargs):
        out = plan.fused.forward(layer, x, plan)  # a decode step's fused group (fused.py)
        if out is not None:
            return out
    result = layer.base_layer(x, *args, **kwargs)
    return add_rows(layer, result, x, plan) if layer.r else result


def add_rows(
    layer: nn.Module, result: torch.Tensor, x: torch.Tensor, plan: RowPlan
) -> torch.Tensor:
    """result + each row's own adapter, in one of the three ways of the module's text."""
    if layer.merged_adapters:
        raise RuntimeError("per-row adapters need unmerged adapters; call unmerge_adapter()")
    if x.shape[0] != plan.rows:
        raise ValueError(f"the batch has {x.shape[0]} rows but {plan.rows} adapter names")
    if plan.single is not None:
        return add_adapter(layer, result, x, plan.single) if plan.single in layer.r else result
    inference = not (torch.is_grad_enabled() or layer.training)
    packed = None  # packed weights are detached copies, and pay off for few tokens only
    if inference and x.numel() // x.shape[-1] <= FEW_ROWS:
        packed = plan.packed_layout(layer)
    if packed is not None:
        return add_packed(layer, result, x, plan, packed)
    for name, rows, span in plan.groups:
        if name not in layer.r:
            continue
        if inference and span is not None and layer.kind != "embedding":
            part = result[span[0] : span[1]]  # the group's rows are one block: no gather
            added = add_adapter(layer, part, x[span[0] : span[1]], name)
            if added.data_ptr() != part.data_ptr():
                part.copy_(added)
            continue
        if name in layer.lora_magnitude_vector:
            delta = layer._delta(x.index_select(0, rows), name, result.index_select(0, rows))
        else:
            delta = layer._delta(x.index_select(0, rows), name, result)  # reads result's dtype
        result = result.index_add(0, rows, delta)
    return result


def add_adapter(layer: nn.Module, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """result + scaling * B(A(dropout(x))) as one addmm when the dtypes allow it (else the
    layer's `_delta`); without autograd added into `result` in place, saving a pass over it."""
    if name in layer.lora_magnitude_vector or layer.lora_bias.get(name):
        return result + layer._delta(x, name, result)
    a, b = layer.lora_weights(name)
    same_dtype = result.dtype == a.dtype
    autocast = torch.is_autocast_enabled(result.device.type)
    if layer.kind == "embedding" or not (same_dtype or autocast):
        return result + layer._delta(x, name, result)
    masked, factor = shared.dropped(layer, x, name)  # dropout(x) = factor * masked
    h = F.linear(masked, a)  # (..., r)
    flat, h = result.reshape(-1, layer.out_features), h.reshape(-1, h.shape[-1])
    alpha = layer.scaling[name] * factor
    if torch.is_grad_enabled() or autocast:  # in-place ops are not autocast
        return torch.addmm(flat, h, b.T, alpha=alpha).view(result.shape)
    # Without autograd the base output is ours alone: add into it, saving a pass over it.
    return flat.addmm_(h, b.T, alpha=alpha).view(result.shape)


def add_packed(
    layer: nn.Module,
    result: torch.Tensor,
    x: torch.Tensor,
    plan: RowPlan,
    packed: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """result + ((x @ A^T) * M) @ B^T over the packed adapters (the module's text)."""
    a, b, mask = packed
    x = x.reshape(-1, x.shape[-1]).to(a.dtype)  # (tokens, in)
    if x.shape[0] != plan.rows:  # several tokens per row: each token takes its row's mask
        mask = mask.repeat_interleave(x.shape[0] // plan.rows, 0)
    flat = result.reshape(-1, layer.out_features)
    in_place = flat.dtype == a.dtype and not torch.is_autocast_enabled(result.device.type)
    if few_rows(x):  # see lorakit.ops.few_rows; MKL is fastest with x^T as a view
        h = torch.mm(a, x.T).T.contiguous().mul_(mask)  # (tokens, span)
        if in_place:  # b.T is contiguous (PackedLayer)
            return flat.addmm_(h, b.T).view(result.shape)
        delta = h @ b.T
    else:
        delta = F.linear(F.linear(x, a).mul_(mask), b)
    if in_place:
        return flat.add_(delta).view(result.shape)
    return result + delta.to(result.dtype).view(result.shape)


@contextlib.contextmanager
def reading_rows(wrappers: list[nn.Module], plan: RowPlan) -> Iterator[None]:
    """Inside the context every wrapper (`LoraLinear`, `ModulesToSave`) reads `plan`."""
    for module in wrappers:
        module.set_rows(plan)
    try:
        yield
    finally:
        for module in wrappers:
            module.set_rows(None)
