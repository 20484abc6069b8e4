"""Decode-step LoRA for batches that mix adapters: all adapters' A and B packed side by side.

For every LoRA layer, with the loaded adapters 1..n packed as A_cat (n·r, in) and
B_cat (out, n·r), one decode step computes

    delta = ((x @ A_cat^T) * M) @ B_cat^T,    x (B, T, in), M (B, n·r)

where row b of M holds its adapter's `scaling` over that adapter's r columns and 0 elsewhere
(all 0 for a base row). That is two dense matmuls per layer whatever the mix of adapters,
instead of a gather, two matmuls and a scatter per adapter. Packing costs a copy of the
adapter weights and n·r columns of compute, so the engine uses it only while the packed rank
per layer stays small, and falls back to the core's grouped rows otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class PackedLora:
    """The packed weights of every loaded adapter, and a context that applies them per row."""

    def __init__(self, lora_model: nn.Module, adapters: list[str]) -> None:
        from lorakit.layers import LoraLinear

        self.adapters = list(adapters)
        self.layers: list[tuple[nn.Module, torch.Tensor, torch.Tensor, list[tuple[str, int]]]] = []
        for module in lora_model.base_model.modules():
            if not isinstance(module, LoraLinear):
                continue
            names = [name for name in self.adapters if name in module.r]
            if not names:
                continue
            weights = [module.lora_weights(name) for name in names]
            dtype = module.base_layer.weight.dtype if hasattr(module.base_layer, "weight") else None
            a_cat = torch.cat([a for a, _ in weights]).detach()  # (n·r, in)
            b_cat = torch.cat([b for _, b in weights], dim=1).detach()  # (out, n·r)
            if dtype is not None and dtype.is_floating_point:
                a_cat, b_cat = a_cat.to(dtype), b_cat.to(dtype)
            blocks = [(name, module.r[name]) for name in names]
            self.layers.append((module, a_cat.contiguous(), b_cat.contiguous(), blocks))
        self.all_lora = [m for m in lora_model.base_model.modules() if isinstance(m, LoraLinear)]

    @staticmethod
    def supported(lora_model: nn.Module, max_rank: int) -> bool:
        """True when every adapter lives in linear-like LoRA layers and the packing stays small."""
        from lorakit.layers import EMBEDDING, LoraLinear, ModulesToSave

        for module in lora_model.base_model.modules():
            if isinstance(module, ModulesToSave):
                return False
            if isinstance(module, LoraLinear):
                if module.kind == EMBEDDING or module.merged_adapters:
                    return False
                if sum(module.r.values()) > max_rank:
                    return False
        return True

    @contextlib.contextmanager
    def rows(self, names: list[str | None]) -> Iterator[None]:
        """Within the context, batch row i gets adapter names[i] (None: the base model)."""
        masks: dict[tuple, torch.Tensor] = {}
        handles = []
        for module, a_cat, b_cat, blocks in self.layers:
            key = tuple(blocks)
            if key not in masks:
                masks[key] = self._mask(module, blocks, names, a_cat)
            handles.append(module.register_forward_hook(_hook(a_cat, b_cat, masks[key])))
        for module in self.all_lora:
            module.set_row_groups([])  # the layers themselves add no LoRA: the hooks do
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for module in self.all_lora:
                module.set_row_groups(None)

    @staticmethod
    def _mask(
        module: nn.Module,
        blocks: list[tuple[str, int]],
        names: list[str | None],
        like: torch.Tensor,
    ) -> torch.Tensor:
        mask = torch.zeros(len(names), like.shape[0], dtype=like.dtype, device=like.device)
        start = 0
        for adapter, rank in blocks:
            for row, name in enumerate(names):
                if name == adapter:
                    mask[row, start : start + rank] = module.scaling[adapter]
            start += rank
        return mask[:, None, :]  # (B, 1, n·r), broadcast over the step's tokens


def _hook(a_cat: torch.Tensor, b_cat: torch.Tensor, mask: torch.Tensor):
    def add_lora(_module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        h = F.linear(args[0].to(a_cat.dtype), a_cat).mul_(mask)  # (B, T, n·r)
        if torch.is_grad_enabled() or output.dtype != h.dtype:
            return output + F.linear(h, b_cat).to(output.dtype)
        # Decoding runs without autograd: add B_cat·h into the layer's output in place.
        flat = output.reshape(-1, output.shape[-1])
        return flat.addmm_(h.reshape(-1, h.shape[-1]), b_cat.T).view(output.shape)

    return add_lora
