"""Quantized fused expert tensors: the 3-D parameters of a mixture of experts, stored per expert
slice as int8 / NF4 / FP4 codes (with double quantization), dequantized where they are read.

In transformers 5 an MoE block keeps its experts as fused parameters (`experts.gate_up_proj`,
`experts.down_proj`: one (out, in) slice per expert, stacked on dimension 0). They are most of
an MoE model's weights, so QLoRA must quantize them; they are not linear layers, so
`QuantLinear` cannot hold them.

`QuantExperts` is a tensor subclass that stands in the parameter's place: it has the shape, dtype
and device of the float tensor (so the expert module's own forward, LoRA on the parameter and
every reader of `named_parameters` work unchanged) while holding only the codes. Each expert
slice is quantized on its own, as `QuantLinear` quantizes one weight (`quant.layer`'s math): int8
with one scale per row of the slice, 4-bit in blocks of 64 that never straddle two experts, the
block absmaxes double-quantized. Reading it:

* `w[e]` (how expert modules take one expert) dequantizes that expert only;
* any other operation (`w + dW`, `w.float()`, a grouped matmul over all experts) sees the whole
  tensor dequantized, in the compute dtype; the result is a plain tensor;
* `w.copy_(new)` (how a merge writes a weight back) quantizes `new` into the codes.

Autograd keeps the dequantized slices the forward used until backward, so training holds a
dequantized copy of the experts a layer used unless gradient checkpointing recomputes it
(`prepare_model_for_kbit_training` turns it on).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

from lorakit.quant import codes

aten = torch.ops.aten


class QuantExperts(torch.Tensor):
    """A frozen (experts, ...) float tensor held as quantized codes, one slice per expert."""

    @staticmethod
    def __new__(cls, store: dict, shape: torch.Size, dtype: torch.dtype, device: torch.device):
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=dtype, device=device, requires_grad=False
        )

    def __init__(self, store: dict, shape, dtype, device) -> None:
        self.store = store  # method, double_quant and the code tensors (see `_quantize`)

    @classmethod
    def quantize(
        cls, weight: torch.Tensor, method: str, double_quant: bool = True, dtype=None
    ) -> QuantExperts:
        """Quantize a float (experts, ...) tensor; `dtype`: the compute dtype (default: its own)."""
        if weight.dim() < 2:
            raise ValueError(f"expected an (experts, ...) tensor, got shape {tuple(weight.shape)}")
        dtype = dtype or weight.dtype
        store = _quantize(weight.detach(), method, double_quant and method != "int8")
        return cls(store, weight.shape, dtype, weight.device)

    def dequantize(self, dtype: torch.dtype | None = None, expert: int | None = None):
        """The whole tensor (or one expert's slice) as a plain tensor in `dtype`."""
        dtype = dtype or self.dtype
        slices = range(self.shape[0]) if expert is None else [expert]
        out = torch.stack([_dequantize(self.store, e, dtype) for e in slices])
        shape = self.shape if expert is None else self.shape[1:]
        return out.reshape(shape)

    def storage_bytes(self) -> int:
        """Bytes the codes and scales take."""
        return sum(t.numel() * t.element_size() for t in self.store.values() if _is_tensor(t))

    def __repr__(self) -> str:
        return (
            f"QuantExperts(shape={tuple(self.shape)}, method={self.store['method']}, "
            f"dtype={self.dtype})"
        )

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        me = args[0] if args and isinstance(args[0], QuantExperts) else None
        if me is not None and func in (aten.detach.default, aten.alias.default):
            return QuantExperts(me.store, me.shape, me.dtype, me.device)
        if me is not None and func is aten.select.int and args[1] == 0:
            return me.dequantize(expert=int(args[2]) % me.shape[0])
        if me is not None and func is aten.copy_.default:
            me.store.update(_quantize(args[1].detach(), me.store["method"], me.store["dq"]))
            return me
        if me is not None and func is aten._to_copy.default:
            return me._moved(kwargs)
        if func in (aten.copy_.default, aten.add_.Tensor, aten.mul_.Tensor):
            raise RuntimeError(f"{func} would write into quantized experts; use copy_")

        def plain(t):
            return t.dequantize() if isinstance(t, QuantExperts) else t

        return func(*tree_map(plain, args), **tree_map(plain, kwargs))

    def _moved(self, kwargs: dict) -> torch.Tensor:
        """`.to(...)`: a float dtype becomes the compute dtype; a device moves the codes."""
        device = kwargs.get("device") or self.device
        dtype = kwargs.get("dtype") or self.dtype
        store = {k: v.to(device) if _is_tensor(v) else v for k, v in self.store.items()}
        return QuantExperts(store, self.shape, dtype, torch.device(device))


def _is_tensor(value) -> bool:
    return isinstance(value, torch.Tensor)


def _quantize(weight: torch.Tensor, method: str, double_quant: bool) -> dict:
    """The codes of every expert slice: int8 rows of each slice, or 4-bit blocks with each slice
    padded to whole blocks (so no block mixes two experts)."""
    experts = weight.shape[0]
    flat = weight.reshape(experts, -1)
    if method == "int8":
        rows = weight.reshape(-1, weight.shape[-1])  # every row of every slice
        q, absmax = codes.quantize_int8_rows(rows)
        return {"method": method, "dq": False, "experts": experts, "int8": q, "absmax": absmax}
    per = codes.padded_blocks(flat.shape[1])
    padded = F.pad(flat.float(), (0, per * codes.BLOCK - flat.shape[1]))
    packed, absmax = codes.quantize_4bit(padded, method)
    store = {"method": method, "dq": double_quant, "experts": experts}
    store["packed"] = packed.view(experts, -1)
    if double_quant:
        store["absmax_int8"], store["absmax_scale"], store["absmax_offset"] = codes.double_quantize(
            absmax
        )
    else:
        store["absmax"] = absmax
    store["per"], store["numel"] = per, flat.shape[1]
    return store


def _dequantize(store: dict, expert: int, dtype: torch.dtype) -> torch.Tensor:
    """One expert's slice, flat, in `dtype` (the caller reshapes)."""
    if store["method"] == "int8":
        rows = store["int8"].shape[0] // store["experts"]
        part = slice(expert * rows, (expert + 1) * rows)
        return codes.dequantize_int8_rows(store["int8"][part], store["absmax"][part], dtype)
    per = store["per"]
    if store["dq"]:
        absmax = codes.double_dequantize(
            store["absmax_int8"], store["absmax_scale"], store["absmax_offset"]
        )
    else:
        absmax = store["absmax"]
    blocks = absmax[expert * per : (expert + 1) * per]
    packed = store["packed"][expert]
    return codes.dequantize_4bit(packed, blocks, store["method"], store["numel"], dtype)


# ---------------------------------------------------------------- model level


def expert_targets(model: nn.Module, skip: Iterable[str] = ()) -> list[tuple[str, str]]:
    """(module name, parameter name) of every float 3-D parameter (fused experts), except those
    whose module or `module.parameter` name is in `skip` (exact or `.suffix`, as for layers)."""
    skip = [skip] if isinstance(skip, str) else list(skip)
    found = []
    for name, module in model.named_modules():
        if any(part.startswith("lora_") for part in name.split(".")):
            continue
        for pname, param in module.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            if param.dim() != 3 or not param.is_floating_point() or isinstance(param, QuantExperts):
                continue
            if any(n == e or n.endswith("." + e) for e in skip for n in (name, full)):
                continue
            found.append((name, pname))
    return found


def quantize_expert(
    model: nn.Module, name: str, pname: str, method: str, double_quant: bool, dtype=None
) -> QuantExperts:
    """Replace parameter `pname` of module `name` by its `QuantExperts`, in place."""
    module = model.get_submodule(name) if name else model
    quantized = QuantExperts.quantize(getattr(module, pname), method, double_quant, dtype)
    setattr(module, pname, nn.Parameter(quantized, requires_grad=False))
    return quantized


def dequantize_experts(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Replace every quantized expert parameter by a plain float one, in place; the count."""
    done = 0
    for module in model.modules():
        for pname, param in list(module.named_parameters(recurse=False)):
            if isinstance(param, QuantExperts):
                weight = param.dequantize(dtype or param.dtype)
                setattr(module, pname, nn.Parameter(weight, requires_grad=False))
                done += 1
    return done


def quantized_experts(model: nn.Module) -> list[QuantExperts]:
    """Every quantized expert tensor of `model`, each once."""
    seen: dict[int, QuantExperts] = {}
    for param in model.parameters():
        if isinstance(param, QuantExperts):
            seen.setdefault(id(param), param)
    return list(seen.values())
