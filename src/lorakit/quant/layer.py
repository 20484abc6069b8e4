"""QLoRA base layers: weight-only int8, NF4 and FP4 in pure PyTorch.

Math (W is a frozen (out, in) weight; the LoRA layer around it is unchanged):

* int8, one scale per output row:  q[o, i] = round(127 * W[o, i] / m_o),  m_o = max_i |W[o, i]|,
  and W ~ q * m_o / 127. Stored: 8 bits per weight + one fp32 per row.
* 4-bit (NF4 / FP4), blocks of 64 consecutive weights of the row-major W (the last block is
  zero-padded): m_b = max |W_b|,  q = argmin_k |W / m_b - T[k]|,  W ~ T[q] * m_b, where T is the
  16-value code table (NF4: the QLoRA paper's normal-float quantiles; FP4: E2M1 / 6). Two codes
  per byte, the first in the high nibble. Stored: 4 bits + 32 / 64 = 4.5 bits per weight.
* Double quantization stores the block absmaxes m_b themselves in 8 bits: with mu = mean(m),
  groups of 256 centred values c = m - mu get one fp32 scale s_g = max |c| and int8 codes
  round(127 * c / s_g). Stored: 4 + 8 / 64 + 32 / (64 * 256) ~ 4.127 bits per weight.
* Forward: y = x W~^T + b, with W~ dequantized on the fly in the compute dtype (one table
  lookup per byte, then one multiply by the block absmax); the backward pass dequantizes again
  instead of keeping W~ alive, so a quantized base costs its packed size during training too.
* Merging a LoRA delta dW: W' = W~ (fp32) + dW, stored as a plain nn.Linear in a float dtype;
  re-quantizing W' is optional and its extra error ||Q(W') - W'|| is reported.
* A mixture of experts' fused 3-D expert parameters are quantized too, each expert slice as one
  such weight (`quant.experts`), by `quantize_model` and while loading.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lorakit.errors import ConfigError, closest
from lorakit.quant import codes
from lorakit.quant.experts import (
    QuantExperts,
    dequantize_experts,
    expert_targets,
    quantize_expert,
)

METHODS = ("nf4", "fp4", "int8")
DEFAULT_SKIP = ("lm_head",)  # the output layer stays in float unless asked otherwise


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ConfigError(
            f"quantization method `{method}` is not supported{closest(str(method), METHODS)}; "
            f"use one of {', '.join(METHODS)}"
        )


class QuantLinear(nn.Module):
    """A frozen linear layer stored as int8 / NF4 / FP4 buffers, dequantized in forward."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        method: str = "nf4",
        bias: bool = False,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        _check_method(method)
        self.in_features = in_features
        self.out_features = out_features
        self.method = method
        self.double_quant = double_quant and method != "int8"
        self.compute_dtype = compute_dtype
        self._register_empty_buffers(device)
        bias_value = torch.zeros(out_features, dtype=compute_dtype, device=device)
        self.bias = nn.Parameter(bias_value, requires_grad=False) if bias else None

    def _register_empty_buffers(self, device) -> None:
        """Buffers of the right shapes, so a state dict can be loaded into a fresh layer."""
        out, inp, f32 = self.out_features, self.in_features, torch.float32
        if self.method == "int8":
            self.register_buffer(
                "weight_int8", torch.zeros(out, inp, dtype=torch.int8, device=device)
            )
            self.register_buffer("weight_absmax", torch.zeros(out, dtype=f32, device=device))
            return
        blocks = codes.padded_blocks(out * inp)
        self.register_buffer(
            "weight_packed",
            torch.zeros(blocks * codes.BLOCK // 2, dtype=torch.uint8, device=device),
        )
        if not self.double_quant:
            self.register_buffer("weight_absmax", torch.zeros(blocks, dtype=f32, device=device))
            return
        groups = codes.padded_blocks(blocks, codes.ABSMAX_BLOCK)
        self.register_buffer("absmax_int8", torch.zeros(blocks, dtype=torch.int8, device=device))
        self.register_buffer("absmax_scale", torch.zeros(groups, dtype=f32, device=device))
        self.register_buffer("absmax_offset", torch.zeros((), dtype=f32, device=device))

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        method: str = "nf4",
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> QuantLinear:
        """Quantize an (out, in) weight (and keep an optional bias) into a new QuantLinear."""
        if weight.dim() != 2:
            raise ValueError(f"expected a 2-d (out, in) weight, got shape {tuple(weight.shape)}")
        out, inp = weight.shape
        dtype = compute_dtype or (weight.dtype if weight.is_floating_point() else torch.float32)
        layer = cls(inp, out, method, bias is not None, double_quant, dtype, weight.device)
        layer._store(weight)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        method: str = "nf4",
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> QuantLinear:
        """Quantize an nn.Linear or a transformers Conv1D (whose weight is stored (in, out))."""
        weight = linear.weight
        if type(linear).__name__ == "Conv1D":
            weight = weight.t()
        return cls.from_weight(weight, linear.bias, method, double_quant, compute_dtype)

    def store(self, weight: torch.Tensor) -> None:
        """Quantize `weight` (out, in), cast to the compute dtype, into this layer in place of
        its weight (how a change to the dequantized weight, such as a merge, is written back)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"expected an ({self.out_features}, {self.in_features}) weight, got shape "
                f"{tuple(weight.shape)}"
            )
        self._store(weight.to(self.compute_dtype))

    def _store(self, weight: torch.Tensor) -> None:
        """Quantize `weight` into this layer's buffers."""
        if self.method == "int8":
            self.weight_int8, self.weight_absmax = codes.quantize_int8_rows(weight)
            return
        packed, absmax = codes.quantize_4bit(weight, self.method)
        self.weight_packed = packed
        if self.double_quant:
            self.absmax_int8, self.absmax_scale, self.absmax_offset = codes.double_quantize(absmax)
        else:
            self.weight_absmax = absmax

    def block_absmax(self) -> torch.Tensor:
        """The fp32 absmax of every 64-weight block (after double dequantization if used)."""
        if self.double_quant:
            return codes.double_dequantize(self.absmax_int8, self.absmax_scale, self.absmax_offset)
        return self.weight_absmax

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) weight in `dtype` (default: the compute dtype)."""
        dtype = dtype or self.compute_dtype
        if self.method == "int8":
            return codes.dequantize_int8_rows(self.weight_int8, self.weight_absmax, dtype)
        numel = self.out_features * self.in_features
        flat = codes.dequantize_4bit(
            self.weight_packed, self.block_absmax(), self.method, numel, dtype
        )
        return flat.view(self.out_features, self.in_features)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) @ W~^T -> (..., out) in x's dtype, without the bias."""
        if self.method == "int8":  # the row scale commutes with the matmul: apply it to y
            y = torch.nn.functional.linear(x, self.weight_int8.to(x.dtype))
            return y * (self.weight_absmax / codes.INT8_MAX).to(x.dtype)
        return torch.nn.functional.linear(x, self.dequantize(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x W~^T + b, computed in the compute dtype, returned in x's dtype."""
        h = x.to(self.compute_dtype)
        if torch.is_grad_enabled() and h.requires_grad:
            y = _dequantized_matmul(h, self)
        else:
            y = self.matmul(h)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype)

    def storage_bytes(self) -> int:
        """Bytes held by the quantized weight buffers (the bias excluded)."""
        return sum(buffer.numel() * buffer.element_size() for buffer in self.buffers())

    def bits_per_parameter(self) -> float:
        """Measured storage of the weight in bits per weight."""
        return 8 * self.storage_bytes() / (self.out_features * self.in_features)

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"method={self.method}{dq}, compute_dtype={self.compute_dtype}, "
            f"bias={self.bias is not None}"
        )

    def _apply(self, fn, recurse=True):
        """Move buffers with .to()/.cuda(), but keep the fp32 scales fp32: a float cast
        (model.to(torch.bfloat16), .half()) changes the compute dtype instead."""
        device = next(iter(self._buffers.values())).device
        probes = [
            fn(torch.zeros((), dtype=dt, device=device)) for dt in (torch.float64, torch.float16)
        ]
        scales = {name: b for name, b in self._buffers.items() if b.is_floating_point()}
        super()._apply(fn, recurse)
        for name, buffer in scales.items():
            self._buffers[name] = buffer.to(probes[0].device)
        cast = [
            p.dtype
            for p, dt in zip(probes, (torch.float64, torch.float16), strict=True)
            if p.dtype != dt
        ]
        if cast and cast[0].is_floating_point:
            self.compute_dtype = cast[0]
        return self


class _DequantizedMatmul(torch.autograd.Function):
    """x @ W~^T whose backward re-dequantizes W~ instead of saving it (W~ is frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
        ctx.layer = layer
        return layer.matmul(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        weight = ctx.layer.dequantize(grad_output.dtype)  # (out, in)
        return grad_output @ weight, None


@torch.compiler.disable  # dynamo cannot trace an autograd.Function given a module: runs eager
def _dequantized_matmul(x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
    """x W~^T with the weight dequantized again in backward (`_DequantizedMatmul`)."""
    return _DequantizedMatmul.apply(x, layer)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _skipped(name: str, skip: Iterable[str]) -> bool:
    """Exact name or `.suffix` match, the same rule as LoRA target names; LoRA's own layers too."""
    parts = name.split(".")
    if any(part.startswith("lora_") for part in parts):
        return True
    return any(name == entry or name.endswith("." + entry) for entry in skip)


def check_skip(model: nn.Module, skip: Iterable[str] | None) -> None:
    """Raise ConfigError for a `skip` entry that names no linear layer of `model` (a typo)."""
    if skip is None:
        return
    linear = [name for name, module in model.named_modules() if name and _is_linear(module)]
    linear += [f"{m}.{p}" if m else p for m, p in expert_targets(model)]  # and their modules
    linear += [m for m, _ in expert_targets(model)]
    for entry in [skip] if isinstance(skip, str) else skip:
        if not any(name == entry or name.endswith("." + entry) for name in linear):
            suffixes = {name.rsplit(".", 1)[-1] for name in linear}
            raise ConfigError(
                f"skip entry `{entry}` names no linear layer of {type(model).__name__}"
                f"{closest(str(entry), suffixes)}; entries are layer names or their last dotted "
                f"parts (e.g. {', '.join(sorted(suffixes)[:3])})"
            )


def quantize_model(
    model: nn.Module,
    method: str = "nf4",
    double_quant: bool = True,
    skip: Iterable[str] = DEFAULT_SKIP,
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Replace every nn.Linear / Conv1D (except `skip` and tied weights) by a QuantLinear, and
    every fused 3-D expert parameter of a mixture of experts by a `QuantExperts`, in place.

    `skip` entries match a module's full name or its last dotted parts (`lm_head`,
    `mlp.down_proj`; for experts also `experts.down_proj`). A linear whose weight is shared with
    another module (tied embeddings) is left as it is. `double_quant` applies to the 4-bit
    methods. Returns `model`.
    """
    _check_method(method)
    for name in quantization_targets(model, skip):
        quantize_layer(model, name, method, double_quant, compute_dtype)
    for name, param in expert_targets(model, skip):
        quantize_expert(model, name, param, method, double_quant, compute_dtype)
    return model


def quantization_targets(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP) -> list[str]:
    """Names of the layers `quantize_model` replaces: linear, not in `skip`, weight not shared.

    Only parameter identity is used, so this works on a model whose weights are still on the
    meta device (`lorakit.quant.load` picks its layers with it before reading any weight).
    """
    skip = [skip] if isinstance(skip, str) else list(skip)
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    return [
        name
        for name, module in model.named_modules()
        if _is_linear(module)
        and name
        and not _skipped(name, skip)
        and owners.get(id(module.weight), 0) == 1
    ]


def quantize_layer(
    model: nn.Module,
    name: str,
    method: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> QuantLinear:
    """Replace the linear layer `name` of `model` by its QuantLinear, in place; return it."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    quantized = QuantLinear.from_linear(getattr(parent, child), method, double_quant, compute_dtype)
    setattr(parent, child, quantized)
    return quantized


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> tuple[nn.Module, str]:
    """Replace every QuantLinear by an nn.Linear in `dtype` (default: its compute dtype),
    in place."""
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        weight = layer.dequantize(torch.float32)
        setattr(parent, child, _float_linear(weight, layer.bias, dtype or layer.compute_dtype))
    kinds = sorted({f"{layer.method}" for _, layer in targets})
    experts = dequantize_experts(model, dtype)
    what = f" and {experts} expert tensors" if experts else ""
    return model, (
        f"dequantized {len(targets)} quantized linear layers{what} "
        f"({', '.join(kinds) or 'none'}) to {'float' if experts else 'nn.Linear'} in "
        f"{_dtype_name(dtype) if dtype else 'their compute dtype'}"
    )


def model_nbytes(model: nn.Module) -> int:
    """Bytes held by a model's parameters and buffers, each shared tensor counted once
    (quantized experts by their codes)."""
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            if isinstance(tensor, QuantExperts):
                total += tensor.storage_bytes()
            else:
                total += tensor.numel() * tensor.element_size()
    return total


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm | nn.GroupNorm) or type(module).__name__.endswith(
        ("LayerNorm", "RMSNorm")
    )


def prepare_model_for_kbit_training(
    model: nn.Module,
    gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict | None = None,
) -> nn.Module:
    """Freeze the base, cast layer norms to fp32, enable input gradients and checkpointing."""
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if _is_norm(module):
            module.float()
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if gradient_checkpointing:
        _enable_checkpointing(model, gradient_checkpointing_kwargs or {"use_reentrant": False})
    return model


def _enable_checkpointing(model: nn.Module, kwargs: dict) -> None:
    """Turn on a Hugging Face model's activation (a.k.a. gradient) checkpointing."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ConfigError(
            f"gradient_checkpointing=True needs a Hugging Face model with "
            f"gradient_checkpointing_enable(); {type(model).__name__} has none. "
            "Pass gradient_checkpointing=False or checkpoint the model yourself."
        )
    if getattr(getattr(model, "config", None), "use_cache", None):
        model.config.use_cache = False  # a KV cache is useless when recomputing


def merge_into_quantized(
    quant_linear: QuantLinear,
    delta_weight: torch.Tensor,
    requantize: bool = False,
    dtype: torch.dtype | None = None,
) -> tuple[nn.Module, str]:
    """Dequantize, add the LoRA delta (out, in), and return (merged layer, what was done).

    By default the merged layer is an nn.Linear in `dtype` (default: the compute dtype);
    with `requantize=True` it is a new QuantLinear of the same method, and the message gives
    the extra error that re-quantizing adds.
    """
    shape = (quant_linear.out_features, quant_linear.in_features)
    if tuple(delta_weight.shape) != shape:
        raise ValueError(
            f"LoRA delta has shape {tuple(delta_weight.shape)} but the quantized layer's weight "
            f"is {shape} (out, in); transpose a fan_in_fan_out delta before merging"
        )
    dtype = dtype or quant_linear.compute_dtype
    merged = quant_linear.dequantize(torch.float32) + delta_weight.detach().float()
    if not torch.isfinite(merged).all():
        raise ValueError("merged weight has NaN or inf values; the adapter is broken, not merged")
    bias = quant_linear.bias
    what = f"{quant_linear.method}{' (double quant)' if quant_linear.double_quant else ''}"
    if requantize:
        layer = QuantLinear.from_weight(
            merged, bias, quant_linear.method, quant_linear.double_quant, dtype
        )
        error = layer.dequantize(torch.float32) - merged
        relative = error.norm() / merged.norm().clamp_min(1e-30)
        return layer, (
            f"dequantized {what} {shape[0]}x{shape[1]} weight, added the LoRA delta, "
            f"re-quantized to {what}: extra error rms {error.pow(2).mean().sqrt():.3e}, "
            f"max {error.abs().max():.3e}, relative {relative:.3e}"
        )
    return _float_linear(merged, bias, dtype), (
        f"dequantized {what} {shape[0]}x{shape[1]} weight, added the LoRA delta, "
        f"stored as nn.Linear in {_dtype_name(dtype)} (not re-quantized)"
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _float_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    """A frozen nn.Linear holding `weight` (out, in) and `bias` in `dtype`."""
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias is not None, weight.device, dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer.requires_grad_(False)
