"""LoRA on `nn.MultiheadAttention`: `LoraMHA` adapts its in_proj and its out_proj.

A MultiheadAttention holds q, k and v as one parameter, `in_proj_weight` (3E, E), and its
forward reads `out_proj.weight` and `out_proj.bias` without calling `out_proj`. As in peft, an
adapter of rank r therefore has two parts:

    in_proj:  A (r, E), B (3E, r)      `<path>.lora_A.weight`, `<path>.lora_B.weight`
    out_proj: A (r, E), B (E, r)       `<path>.base_layer.out_proj.lora_A.weight`, ...

and the forward runs the base layer with both weights read as W + the running adapters'
scaling * B @ A: in_proj_weight swapped in for the call (`_swapped`, the swap
`torch.func.functional_call` makes), out_proj's through its `weight` (below). Nothing is written
into the base, and autograd reaches A and B. peft merges the weights in
before its forward and unmerges them after; the outputs are the same. LoRA dropout has no
effect here, as in peft (no input passes through A alone).

The out_proj part is a `LoraOutProj`, a `LoraLinear` whose `weight` is its base's W + dW and
`bias` its base's, nested at `base_layer.out_proj`, so its keys are peft's and merging,
unmerging, deleting and casting reach it as any LoRA layer. `LoraMHA.in_proj_weight` and
`LoraMHA.out_proj.weight` read the updated weights too, for code that reads them itself instead
of calling the attention (nn.TransformerEncoderLayer's inference fast path; peft answers the
base weights there, so its adapter is silently left out).

Only layers whose q, k and v share the embedding size (`_qkv_same_embed_dim`) can be adapted;
DoRA, PiSSA / OLoRA / LoftQ and per-row adapters (`adapter_names=`) are refused, as peft
refuses them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.lora import inits
from lorakit.lora.layers import MHA, LoraLinear

_NAME = "MultiheadAttention"


def _updated(layer: LoraLinear, names: list[str]) -> torch.Tensor:
    """The layer's weight + scaling * B @ A of each of `names` not merged into it."""
    weight = layer._base_weight()
    for name in names:
        if name in layer.r and name not in layer.merged_adapters:
            a, b = layer.lora_weights(name)
            weight = weight + ((b @ a) * layer.scaling[name]).to(weight.dtype)
    return weight


class LoraOutProj(LoraLinear):
    """The out_proj of a MultiheadAttention, which reads its `weight` and `bias` without calling
    it: `weight` is W + the running adapters' updates (W alone when none runs)."""

    @property
    def weight(self) -> torch.Tensor:
        return _updated(self, self._running())

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def packable(self) -> bool:
        return False


class LoraMHA(LoraLinear):
    """Wraps an `nn.MultiheadAttention`: adapters on in_proj here, on out_proj in a nested
    `LoraOutProj`. Attributes it lacks (`embed_dim`, `num_heads`, `batch_first`, ...) are the
    base layer's; `out_proj` is the base's own out_proj layer, as in peft."""

    kinds = (MHA,)
    no_dora = (
        f"{_NAME} does not support DoRA (yet), please set use_dora to False (peft refuses it "
        "too); adapt it with plain LoRA or leave it out of target_modules"
    )

    def __init__(self, base_layer: nn.Module) -> None:
        if not base_layer._qkv_same_embed_dim:
            raise ConfigError(
                f"Only same embed for query/key/value is supported as of now for {_NAME} "
                f"(kdim={base_layer.kdim}, vdim={base_layer.vdim}, embed_dim="
                f"{base_layer.embed_dim}): LoRA adapts the packed in_proj_weight, which this "
                "layer does not have (as in peft); leave it out of target_modules"
            )
        if not isinstance(base_layer.out_proj, nn.Linear):
            raise TypeError(f"out_proj must be an instance of nn.Linear for {_NAME}")
        super().__init__(base_layer)
        base_layer.out_proj = LoraOutProj(base_layer.out_proj)

    def _in_out(self, base_layer: nn.Module) -> tuple[int, int]:
        return base_layer.embed_dim, 3 * base_layer.embed_dim

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if name.startswith("__") or "base_layer" not in modules:
                raise
            return getattr(modules["base_layer"], name)

    @property
    def out_proj(self) -> LoraOutProj:
        """The adapted out_proj (peft answers its base `nn.Linear`): code that reads
        `attention.out_proj.weight` itself, as nn.TransformerEncoderLayer's inference fast path
        does, gets the updated weight."""
        return self.base_layer.out_proj

    @property
    def in_proj_weight(self) -> torch.Tensor:
        """W + the running adapters' updates, for code that reads it itself (as
        nn.TransformerEncoderLayer's inference fast path does); the base's own parameter is
        `base_layer.in_proj_weight`."""
        return _updated(self, self._running())

    @property
    def _lora_out(self) -> LoraOutProj:
        return self.base_layer.out_proj

    def _base_weight(self) -> torch.Tensor:
        return self.base_layer.in_proj_weight

    @property
    def packable(self) -> bool:
        return False

    # ---------------------------------------------------------------- adapters
    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        use_rslora: bool = False,
        use_dora: bool = False,
        loftq_config: dict | None = None,
    ) -> None:
        """Add (or replace) adapter `adapter_name` on in_proj and on out_proj."""
        if inits.is_mutating(init_lora_weights):
            raise ConfigError(
                f"{_NAME} does not support init_lora_weights={init_lora_weights!r} (peft refuses "
                "it too): use True, False or 'gaussian'"
            )
        args = (adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, use_dora)
        super().update_layer(*args)
        self._lora_out.update_layer(*args)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._lora_out.delete_adapter(adapter_name)

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        super().set_adapter(adapter_names)
        self._lora_out.set_adapter(adapter_names)

    def _restore_weights(self) -> None:
        """peft's hook for weights its forward leaves unregistered; lorakit never replaces the
        base's parameters, so there is nothing to restore."""

    # ---------------------------------------------------------------- forward
    def forward(self, query: torch.Tensor, *args, **kwargs):
        if self._rows is not None:
            raise TypeError(
                f"lora.{_NAME} does not support mixed adapter batches (as in peft): its "
                "attention mixes the rows' projections; run one adapter per batch"
            )
        if self.disable_adapters and self.merged_adapters:
            self.unmerge()
        running = self._running()
        if not running:
            result = self.base_layer(query, *args, **kwargs)
        else:  # out_proj's update comes with its `weight` (LoraOutProj)
            with _swapped(self.base_layer, {"in_proj_weight": _updated(self, running)}):
                result = self.base_layer(query, *args, **kwargs)
        out, attn = result
        return out.to(query.dtype), attn if attn is None else attn.to(query.dtype)

    # ---------------------------------------------------------------- merging
    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Merge into in_proj_weight and out_proj's weight."""
        names = list(adapter_names or self.active_adapters)
        super().merge(names, safe_merge)
        self._lora_out.merge(names, safe_merge)

    @torch.no_grad()
    def unmerge(self, adapter_names: list[str] | None = None) -> None:
        super().unmerge(adapter_names)
        self._lora_out.unmerge(adapter_names)

    def unwrap(self, names: list[str], *, merge: bool, safe_merge: bool = False) -> nn.Module:
        """The MultiheadAttention with its own out_proj back, the adapters merged when `merge`."""
        if merge:
            self.merge(names, safe_merge=safe_merge)
        else:
            self.unmerge()
        base = self.base_layer
        base.out_proj = self._lora_out.base_layer
        return base


@contextlib.contextmanager
def _swapped(module: nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the context, `module`'s tensors at these paths read as the given ones; on leaving
    they are the originals again. Like `torch.func.functional_call`'s swap, and also where a
    wrapper keeps the tensor as a plain attribute beside `_parameters` (FSDP's
    `use_orig_params` does during its forward), which an attribute read finds first."""
    saved = []
    for path, tensor in tensors.items():
        prefix, _, name = path.rpartition(".")
        owner = module.get_submodule(prefix) if prefix else module
        tables = [table for table in (owner._parameters, owner.__dict__) if name in table]
        if not tables:
            raise RuntimeError(f"{type(owner).__name__} holds no tensor `{name}` to update")
        for table in tables:
            saved.append((table, name, table[name]))
            table[name] = tensor
    try:
        yield
    finally:
        for table, name, original in reversed(saved):
            table[name] = original


def out_proj_wrapper(model: nn.Module, name: str) -> type[LoraOutProj] | None:
    """`LoraOutProj` when module `name` of `model` is the out_proj of a MultiheadAttention that
    is not itself adapted (as `all-linear` or a target "out_proj" reaches it): the attention
    reads that layer's weight without calling it, and a `LoraOutProj`'s weight carries the
    update (in peft such an adapter has no effect). None for any other module."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if child != "out_proj" or not isinstance(parent, nn.MultiheadAttention):
        return None
    return LoraOutProj


def file_shapes(base: nn.Module, r: int, use_dora: bool) -> dict[str, tuple[int, ...]]:
    """The adapter file's tensors for a MultiheadAttention `base` at rank r: suffix -> shape."""
    embed = base.embed_dim
    return {
        "lora_A.weight": (r, embed),
        "lora_B.weight": (3 * embed, r),
        "base_layer.out_proj.lora_A.weight": (r, embed),
        "base_layer.out_proj.lora_B.weight": (embed, r),
    }
