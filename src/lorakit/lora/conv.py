"""LoRA on convolutions: `LoraConv` wraps an `nn.Conv1d`, `nn.Conv2d` or `nn.Conv3d`.

For a base convolution (kernel k, stride, padding, dilation, padding mode, g groups), adapter
`a` of rank r is two convolutions, peft's layout:

    A_a: in_channels -> r with the base's kernel, stride, padding, dilation and padding mode
    B_a: r -> out_channels with a 1 x 1 (x 1) kernel, stride 1 and the base's g groups

    y = base(x) + scaling_a * B_a(A_a(dropout_a(x))),    r a multiple of g

so the file keys are `<path>.lora_A.weight` (r, in, *k) and `<path>.lora_B.weight`
(out, r / g, 1, ...).

With g = 1 the update is a convolution of the base kernel's shape. Seen with the kernel
positions as further input features (W as (out, in * prod(k)), A as (r, in * prod(k)), B as
(out, r)) it is dW = scaling * B @ A, a linear layer's, so merging, unmerging and DoRA's merge
are `update.py`'s and `dora.py`'s (`_layout` turns the kernel into that matrix and back). With
g > 1 the update joins every input channel to every output channel while the grouped weight
holds only its group's, so merging is refused (as peft refuses it) and the adapter runs unmerged.

DoRA keeps one magnitude per output channel, in peft's shape (1, out, 1, ...). Its norm is that
of W + scaling * (B as (-1, r)) @ (A as (r, -1)) laid out in W's shape: the norm of W + dW when
g = 1; with g > 1 it is peft's formula, kept so that such adapters compute what they compute in
peft.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.lora import inits
from lorakit.lora.layers import CONVND, LoraLinear

_CONV_BY_DIM = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}  # weight dims -> the plain class


class LoraConv(LoraLinear):
    """Wraps an `nn.Conv1d` / `nn.Conv2d` / `nn.Conv3d` with named adapters."""

    kinds = (CONVND,)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        if self.groups > 1:
            warnings.warn(
                f"LoRA on a {type(base_layer).__name__} with groups={self.groups}: its adapters "
                "run unmerged; merging them is not supported (as in peft)",
                stacklevel=3,
            )

    def _in_out(self, base_layer: nn.Module) -> tuple[int, int]:
        return base_layer.in_channels, base_layer.out_channels

    @property
    def groups(self) -> int:
        return self.base_layer.groups

    @property
    def weight(self) -> torch.Tensor:
        """The base kernel (as peft's wrapper answers: models read `conv.weight.device`)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def _channel_shape(self) -> tuple[int, ...]:
        """(1, -1, 1, ...): a per-channel vector broadcast over a batch of outputs."""
        return (1, -1) + (1,) * (self.base_layer.weight.dim() - 2)

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
        """Add (or replace) adapter `adapter_name` of rank r (a multiple of the groups)."""
        kind = type(self.base_layer).__name__
        if r % self.groups:
            raise ConfigError(
                f"LoRA on a {kind} with groups={self.groups} needs a rank divisible by the "
                f"groups, got r={r}: choose r (or this layer's rank_pattern entry) as a multiple "
                f"of {self.groups}, or leave the layer out of target_modules"
            )
        if init_lora_weights == "loftq":
            init_lora_weights = True  # as peft: LoftQ is for linear layers, a conv gets the default
        elif inits.is_mutating(init_lora_weights):
            raise ConfigError(
                f"init_lora_weights={init_lora_weights!r} on a {kind} is not supported (peft "
                "refuses it too): PiSSA / OLoRA factor a linear weight; use True or 'gaussian'"
            )
        super().update_layer(
            adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, False
        )
        if use_dora:
            magnitude = self.weight_norm(adapter_name, self.base_layer.weight.detach().float())
            a = self.lora_A[adapter_name].weight
            magnitude = magnitude.reshape(self._channel_shape()).to(a.dtype).clone()
            self.lora_magnitude_vector[adapter_name] = nn.Parameter(magnitude)

    def _create_weights(self, name: str, r: int, device, dtype: torch.dtype) -> None:
        base = self.base_layer
        conv = _CONV_BY_DIM[base.weight.dim()]
        ones = (1,) * (base.weight.dim() - 2)
        self.lora_A[name] = conv(
            self.in_features,
            r,
            base.kernel_size,
            base.stride,
            base.padding,
            base.dilation,
            bias=False,
            padding_mode=base.padding_mode,
            device=device,
            dtype=dtype,
        )
        self.lora_B[name] = conv(
            r, self.out_features, ones, ones, groups=base.groups, bias=False, device=device,
            dtype=dtype,
        )  # fmt: skip

    @property
    def packable(self) -> bool:
        """Never: packed rows and fused groups are for linear layers."""
        return False

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters and self.merged_adapters:
            self.unmerge()
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        if self._rows is None:
            for name in self._running():
                result = result + self._delta(x, name, result)
            return result
        return self._add_rows(result, x)

    def _add_rows(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """result + each batch row's own adapter (the per-row plan set by `set_rows`)."""
        plan = self._rows
        if self.merged_adapters:
            raise RuntimeError("per-row adapters need unmerged adapters; call unmerge_adapter()")
        if x.shape[0] != plan.rows:
            raise ValueError(f"the batch has {x.shape[0]} rows but {plan.rows} adapter names")
        for name, rows, _ in plan.groups:
            if name in self.r:
                delta = self._delta(x.index_select(0, rows), name, result.index_select(0, rows))
                result = result.index_add(0, rows, delta)
        return result

    def _delta(self, x: torch.Tensor, name: str, result: torch.Tensor) -> torch.Tensor:
        """scaling * B(A(dropout(x))) in `result`'s dtype; DoRA's term for a DoRA adapter."""
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        x = x.to(lora_a.weight.dtype)
        if name in self.lora_magnitude_vector:
            return self._dora_delta(x, name, result).to(result.dtype)
        return (lora_b(lora_a(self.lora_dropout[name](x))) * self.scaling[name]).to(result.dtype)

    def _dora_delta(self, x: torch.Tensor, name: str, result: torch.Tensor) -> torch.Tensor:
        """(m / n - 1) * (base(x) - bias) + (m / n) * scaling * B(A(x)) per output channel,
        n detached (`dora.py`); with dropout while training both terms see the dropped x."""
        base = self.base_layer
        weight = base.weight.to(x.dtype)
        norm = self.weight_norm(name, weight)
        scale = (self.lora_magnitude_vector[name].reshape(-1) / norm).reshape(self._channel_shape())
        dropout = self.lora_dropout[name]
        if isinstance(dropout, nn.Identity) or not self.training:
            plain = result if base.bias is None else result - base.bias.reshape(scale.shape)
            plain = plain.to(x.dtype)
        else:
            x = dropout(x)
            plain = base._conv_forward(x, weight, None)
        lora = self.lora_B[name](self.lora_A[name](x))
        return (scale - 1) * plain + scale * lora * self.scaling[name]

    def weight_norm(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """DoRA's n (out,), detached: per output channel, the norm of `weight` (the base
        kernel's shape) + scaling * (B as (-1, r)) @ (A as (r, -1)) in that shape."""
        a, b = self.lora_weights(name)
        r = self.r[name]
        update = (b.reshape(-1, r) @ a.reshape(r, -1)).reshape(weight.shape)
        total = weight.detach() + self.scaling[name] * update.detach().to(weight.dtype)
        return torch.linalg.vector_norm(total, dim=tuple(range(1, weight.dim())))

    # ---------------------------------------------------------------- merging
    def _layout(self, weight: torch.Tensor) -> torch.Tensor:
        """The kernel (out, in, *k) as the matrix (out, in * prod(k)), and such a matrix back."""
        if weight.dim() > 2:
            return weight.flatten(1)
        return weight.reshape(self.base_layer.weight.shape)

    def check_merge(self, adapter_names: list[str]) -> None:
        """Merging into a grouped convolution is refused (see the module's text)."""
        if any(n in self.r and n not in self.merged_adapters for n in adapter_names):
            self._refuse_grouped()

    def _refuse_grouped(self) -> None:
        if self.groups > 1:
            raise NotImplementedError(
                f"merging LoRA into a {type(self.base_layer).__name__} with groups={self.groups} "
                "is not supported (as in peft): the update is a full convolution that the "
                "grouped weight cannot hold; use the adapter unmerged"
            )

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """scaling * B @ A in the kernel's shape (out, in, *k); groups = 1 only."""
        self._refuse_grouped()
        return super().delta_weight(adapter_name)

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Write the adapters into the kernel (groups = 1 only; DoRA: see `dora.py`)."""
        self.check_merge(adapter_names or self.active_adapters)
        super().merge(adapter_names, safe_merge)

    @torch.no_grad()
    def merged_delta(self, adapter_names: list[str]) -> torch.Tensor | None:
        self._refuse_grouped()
        return super().merged_delta(adapter_names)


def file_shapes(base: nn.Module, r: int, use_dora: bool) -> dict[str, tuple[int, ...]]:
    """The adapter file's tensors for a conv `base` at rank r: key suffix -> shape."""
    ones = (1,) * (base.weight.dim() - 2)
    shapes = {
        "lora_A.weight": (r, base.in_channels, *base.kernel_size),
        "lora_B.weight": (base.out_channels, r // base.groups, *ones),
    }
    if use_dora:
        shapes["lora_magnitude_vector"] = (1, base.out_channels, *ones)
    return shapes
