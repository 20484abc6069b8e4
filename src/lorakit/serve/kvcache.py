"""The decode batch's KV cache: every request's keys and values, left-padded to one length."""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

_SPARE = 64  # decode steps of room a layer gets each time its buffers are (re)allocated


class GrowingLayer(DynamicLayer):
    """A cache layer with room to grow: a decode step writes its keys and values in place.

    transformers' DynamicLayer concatenates on every step, copying the whole cache each time;
    this one keeps (rows, heads, length + spare, dim) buffers and exposes the filled part as
    `keys` / `values` views, reallocating only when the spare room runs out.
    """

    def __init__(self, parts: list[tuple[torch.Tensor, torch.Tensor]], width: int) -> None:
        """Stack `parts` (each (rows, heads, length, dim) keys and values) right-aligned to
        width."""
        super().__init__()
        first = parts[0][0]
        self.dtype, self.device = first.dtype, first.device
        self.is_initialized = True
        rows = sum(keys.shape[0] for keys, _ in parts)
        shape = (rows, first.shape[1], width + _SPARE, first.shape[3])
        self._keys, self._values = first.new_zeros(shape), first.new_zeros(shape)
        row = 0
        for keys, values in parts:
            end, length = row + keys.shape[0], keys.shape[2]
            self._keys[row:end, :, width - length : width] = keys
            self._values[row:end, :, width - length : width] = values
            row = end
        self._show(width)

    def _show(self, length: int) -> None:
        self.keys = self._keys[:, :, :length]
        self.values = self._values[:, :, :length]

    def update(self, key_states, value_states, *args, **kwargs):
        """Append this step's keys and values; returns all of them."""
        length, end = self.keys.shape[2], self.keys.shape[2] + key_states.shape[2]
        if end > self._keys.shape[2]:
            grown = GrowingLayer([(self.keys, self.values)], length)
            self._keys, self._values = grown._keys, grown._values
        self._keys[:, :, length:end] = key_states
        self._values[:, :, length:end] = value_states
        self._show(end)
        return self.keys, self.values


class BatchCache:
    """Keys and values of every running request, left-padded, with the mask that hides the pads.

    Row i holds request i's cache right-aligned: `cache.layers[l].keys` is
    (B, kv_heads, L, head_dim) and `mask` (B, L) is 1 where a real entry sits. Requests join
    with `add` (the cache of their prefill batch) and leave with `keep`; both only happen
    between steps.
    """

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (B, L) long

    @property
    def rows(self) -> int:
        """Number of requests in the batch."""
        return 0 if self.mask is None else self.mask.shape[0]

    def add(self, prefill: DynamicCache, mask: torch.Tensor, rows: list[int] | None = None) -> None:
        """Append rows of a prefill batch's cache (left-padded, `mask` (b, L)); all rows if None."""
        layers = _tensors(prefill)
        if rows is not None:
            index = torch.tensor(rows, device=mask.device)
            mask = mask.index_select(0, index)
            layers = [(k.index_select(0, index), v.index_select(0, index)) for k, v in layers]
        if self.cache is None or self.mask is None:
            self._set([[part] for part in layers], mask, mask.shape[1])
            return
        width = max(self.mask.shape[1], mask.shape[1])
        parts = [[old, new] for old, new in zip(_tensors(self.cache), layers, strict=True)]
        self._set(parts, torch.cat([_left_pad(self.mask, width), _left_pad(mask, width)]), width)

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order) and drop padding no row needs any more."""
        if self.cache is None or self.mask is None:
            return
        if not rows:
            self.cache = self.mask = None
            return
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int((mask.sum(0) > 0).nonzero()[0])  # first column any row still uses
        parts = [
            [(k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])]
            for k, v in _tensors(self.cache)
        ]
        self._set(parts, mask[:, start:].contiguous(), mask.shape[1] - start)

    def step_mask(self) -> torch.Tensor:
        """The attention mask for one more token per row, (B, L + 1); becomes the new mask."""
        assert self.mask is not None
        ones = torch.ones(self.rows, 1, dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        return self.mask

    def _set(self, parts: list[list[tuple[torch.Tensor, torch.Tensor]]], mask, width) -> None:
        cache = DynamicCache()
        cache.layers = [GrowingLayer(layer_parts, width) for layer_parts in parts]
        self.cache, self.mask = cache, mask


def _tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    if not layers or any(keys is None or keys.dim() != 4 for keys, _ in layers):
        raise RuntimeError("the model returned a KV cache the serving engine cannot batch")
    return layers


def _left_pad(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Pad a (rows, L) mask with zeros on the left to (rows, width)."""
    return torch.nn.functional.pad(mask, (width - mask.shape[1], 0))
