"""The decode batch's KV cache: per-request caches side by side, left-padded to one length."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache


class BatchCache:
    """Keys and values of every running request, left-padded, with the mask that hides the pads.

    Row i holds request i's cache right-aligned: `keys[layer]` is (B, kv_heads, L, head_dim)
    and `mask` (B, L) is 1 where a real entry sits. Requests join with `add` (their own
    batch-1 cache from a solo prefill) and leave with `keep`; both only happen between steps.
    """

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (B, L) long

    @property
    def rows(self) -> int:
        """Number of requests in the batch."""
        return 0 if self.mask is None else self.mask.shape[0]

    def add(self, solo: DynamicCache) -> None:
        """Append one request's batch-1 cache as a new row."""
        layers = _tensors(solo)
        length = layers[0][0].shape[-2]
        solo_mask = torch.ones(1, length, dtype=torch.long, device=layers[0][0].device)
        if self.cache is None or self.mask is None:
            self.cache, self.mask = DynamicCache(ddp_cache_data=layers), solo_mask
            return
        width = max(self.mask.shape[1], length)
        merged = []
        for (keys, values), (new_keys, new_values) in zip(
            _tensors(self.cache), layers, strict=True
        ):
            merged.append(
                (
                    torch.cat([_left_pad(keys, width), _left_pad(new_keys, width)]),
                    torch.cat([_left_pad(values, width), _left_pad(new_values, width)]),
                )
            )
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(solo_mask, width)])
        self.cache = DynamicCache(ddp_cache_data=merged)

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
        self.mask = mask[:, start:].contiguous()
        self.cache = DynamicCache(
            ddp_cache_data=[
                (
                    keys.index_select(0, index)[:, :, start:].contiguous(),
                    values.index_select(0, index)[:, :, start:].contiguous(),
                )
                for keys, values in _tensors(self.cache)
            ]
        )

    def step_mask(self) -> torch.Tensor:
        """The attention mask for one more token per row, (B, L + 1); becomes the new mask."""
        assert self.mask is not None
        ones = torch.ones(self.rows, 1, dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        return self.mask


def _tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    if not layers or any(keys is None or keys.dim() != 4 for keys, _ in layers):
        raise RuntimeError("the model returned a KV cache the serving engine cannot batch")
    return layers


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Pad the sequence axis (-2 for 4-d KV tensors, -1 for a 2-d mask) on the left."""
    axis_len = tensor.shape[-2] if tensor.dim() == 4 else tensor.shape[-1]
    pad = width - axis_len
    if pad == 0:
        return tensor
    return F.pad(tensor, (0, 0, pad, 0)) if tensor.dim() == 4 else F.pad(tensor, (pad, 0))
