"""LoRA on parameters (`LoraConfig.target_parameters`): fused mixture-of-experts tensors and
plain 2-D weights such as a router's.

A targeted parameter W is a 2-D weight (out, in) or a 3-D stack of E experts, (E, out, in), or
(E, in, out) when its module says `is_transposed` (gpt-oss). Adapter `a` of rank r gives every
expert e its own update

    dW_e = scaling_a * B_e @ A_e,   A_e (r, in), B_e (out, r)   (2-D: E = 1)

stored as peft stores it: A (E·r, in) with expert e in rows e·r .. e·r + r - 1 (expert
slowest), B (out, r·E) with expert e in columns k·E + e (expert fastest). The module that owns
W is wrapped in `LoraParams`; its forward runs the owner's own forward with W replaced by
W + dW (one fused batched matmul-add per parameter, `effective`), so any MoE implementation
works unchanged, and only the low-rank factors train. A transformers experts module takes the
leaner route of `lora/experts.py` instead: each expert's tokens through its base slice and its
own factors, no W + dW formed. The owner's other parameters are untouched. A batch whose rows
use different adapters is grouped by adapter (`LoraParams._grouped`). Dropout, DoRA and the
initialisations that read the base weight are refused, as in peft (dropout cannot be written as
a change of W).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from lorakit.errors import ConfigError
from lorakit.lora import experts
from lorakit.lora.config import scaling
from lorakit.lora.experts import expert_factors


def expert_count(param: torch.Tensor) -> int:
    """E for a 3-D expert stack, 1 for a 2-D weight."""
    return param.shape[0] if param.dim() == 3 else 1


def in_out(param: torch.Tensor, transposed: bool) -> tuple[int, int]:
    """(in, out) features of one expert slice of `param` (or of a 2-D weight)."""
    if param.dim() == 2:
        return param.shape[1], param.shape[0]
    if param.dim() != 3:
        raise ConfigError(
            f"LoRA on a {param.dim()}-D parameter is not supported: target_parameters takes "
            "2-D weights and 3-D expert stacks"
        )
    return (param.shape[1], param.shape[2]) if transposed else (param.shape[2], param.shape[1])


def delta(
    a: torch.Tensor, b: torch.Tensor, scale: float, param: torch.Tensor, transposed: bool
) -> torch.Tensor:
    """dW in `param`'s own layout (and shape), in the adapters' dtype."""
    if param.dim() == 2:
        return (b @ a) * scale
    a3, b3 = expert_factors(a, b, param.shape[0])
    if transposed:
        return torch.bmm(a3.transpose(1, 2), b3.transpose(1, 2)) * scale
    return torch.bmm(b3, a3) * scale


def effective(
    weight: torch.Tensor, updates: list[tuple[torch.Tensor, torch.Tensor, float]], transposed: bool
) -> torch.Tensor:
    """W + sum of dW: one fused matmul-add per adapter (addmm / baddbmm) when the dtypes agree,
    so no separate dW tensor the size of W is made."""
    result = weight
    for a, b, scale in updates:
        if a.dtype != weight.dtype:
            result = result + delta(a, b, scale, weight, transposed).to(weight.dtype)
        elif weight.dim() == 2:
            result = torch.addmm(result, b, a, alpha=scale)
        else:
            a3, b3 = expert_factors(a, b, weight.shape[0])
            if transposed:
                result = torch.baddbmm(result, a3.transpose(1, 2), b3.transpose(1, 2), alpha=scale)
            else:
                result = torch.baddbmm(result, b3, a3, alpha=scale)
    return result


class LoraParams(nn.Module):
    """A module whose parameters `targets` carry named LoRA adapters (see the module doc).

    `base_layer` is the original module; A and B of parameter p, adapter a live at
    `lora_A[p][a]`, `lora_B[p][a]`. Attributes the wrapper lacks are the base module's."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.transposed = bool(getattr(base_layer, "is_transposed", False))
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r: dict[str, dict[str, int]] = {}  # adapter -> {parameter: rank}
        self.scaling: dict[str, dict[str, float]] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self._rows = None
        self.lean = True  # experts: the per-expert forward of `lora.experts`, when it applies

    def __getattr__(self, name: str):
        if "_modules" not in self.__dict__:
            raise AttributeError(name)
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or name == "base_layer":
                raise
            return getattr(self._modules["base_layer"], name)

    # ---------------------------------------------------------------- adapters
    def param_names(self, adapter: str | None = None) -> list[str]:
        """The targeted parameters (of one adapter), in the base module's registration order."""
        wanted = self.r.get(adapter, {}) if adapter else set(self.lora_A)
        return [n for n, _ in self.base_layer.named_parameters(recurse=False) if n in wanted]

    def base_param(self, name: str) -> nn.Parameter:
        return self.base_layer.get_parameter(name)

    def add(
        self, adapter: str, param: str, r: int, alpha: float, use_rslora: bool, init: bool | str
    ) -> None:
        """Add adapter `adapter` of rank r on parameter `param` of the base module."""
        weight = self.base_param(param)
        n_in, n_out = in_out(weight, self.transposed)
        experts = expert_count(weight)
        keep = weight.dtype in (torch.float32, torch.float64)
        dtype = weight.dtype if keep else torch.float32
        if param not in self.lora_A:
            self.lora_A[param] = nn.ParameterDict()
            self.lora_B[param] = nn.ParameterDict()
        kw = {"device": weight.device, "dtype": dtype}
        a = nn.Parameter(torch.empty(experts * r, n_in, **kw))
        b = nn.Parameter(torch.empty(n_out, r * experts, **kw))
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(a, std=1 / r)
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            if init is False:
                nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            else:
                nn.init.zeros_(b)
        self.lora_A[param][adapter] = a
        self.lora_B[param][adapter] = b
        self.r.setdefault(adapter, {})[param] = r
        self.scaling.setdefault(adapter, {})[param] = scaling(alpha, r, use_rslora)
        if not self.active_adapters:
            self.active_adapters = [adapter]

    def lora_weights(self, adapter: str, param: str) -> tuple[nn.Parameter, nn.Parameter]:
        """(A (E·r, in), B (out, r·E)) of `adapter` on `param`, in peft's layout."""
        return self.lora_A[param][adapter], self.lora_B[param][adapter]

    def adapter_parameters(self, adapter: str) -> list[nn.Parameter]:
        """The trainable tensors of an adapter (A and B of every parameter it adapts)."""
        return [t for p in self.param_names(adapter) for t in self.lora_weights(adapter, p)]

    def delete_adapter(self, adapter: str) -> None:
        if adapter in self.merged_adapters:
            self.unmerge([adapter])
        for param in list(self.r.get(adapter, {})):
            del self.lora_A[param][adapter]
            del self.lora_B[param][adapter]
            if not len(self.lora_A[param]):
                del self.lora_A[param]
                del self.lora_B[param]
        self.r.pop(adapter, None)
        self.scaling.pop(adapter, None)
        self.active_adapters = [a for a in self.active_adapters if a != adapter]

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        self.active_adapters = [adapter_names] if isinstance(adapter_names, str) else adapter_names

    def set_rows(self, plan) -> None:
        """Per-row adapters (a `rows.RowPlan`) for the next forwards, None to stop. Inside the
        module one weight serves every token, so a batch that mixes adapters is grouped by
        adapter: the module runs once per adapter present and each row keeps its own result."""
        self.__dict__["_rows"] = plan

    # ---------------------------------------------------------------- forward
    def _running(self) -> list[str]:
        if self.disable_adapters:
            return []
        return [a for a in self.active_adapters if a in self.r and a not in self.merged_adapters]

    def forward(self, *args, **kwargs):
        if self.disable_adapters and self.merged_adapters:
            self.unmerge()
        if self._rows is None or self.disable_adapters:
            return self._forward(self._running(), args, kwargs)
        if self.merged_adapters:
            raise ConfigError("per-row adapters need the adapters unmerged; unmerge them first")
        names = list(dict.fromkeys(n if n in self.r else None for n in self._rows.names))
        if len(names) == 1:
            return self._forward([n for n in names if n is not None], args, kwargs)
        return self._grouped(names, args, kwargs)

    def _grouped(self, names: list[str | None], args, kwargs):
        """One forward per adapter in the batch; every output tensor whose first dimension
        counts the batch's rows (or its tokens, rows × positions) takes each row's own."""
        rows = [n if n in self.r else None for n in self._rows.names]
        result = None
        for name in names:
            out = self._forward([name] if name is not None else [], args, kwargs)
            keep = [i for i, n in enumerate(rows) if n == name]
            result = out if result is None else _take_rows(result, out, keep, len(rows))
        return result

    def _forward(self, running: list[str], args, kwargs):
        if not running:
            return self.base_layer(*args, **kwargs)
        updates = {}
        for param in self.param_names():
            found = [
                (*self.lora_weights(a, param), self.scaling[a][param])
                for a in running
                if param in self.r[a]
            ]
            if found:
                updates[param] = found
        if self.lean and experts.can_run(self.base_layer, list(updates)):
            result = experts.forward(self.base_layer, updates, args, kwargs)
            if result is not None:
                return result
        replaced = {
            p: effective(self.base_param(p), found, self.transposed) for p, found in updates.items()
        }
        return functional_call(self.base_layer, replaced, args, kwargs, strict=False)

    # ---------------------------------------------------------------- merging
    def delta_weight(self, adapter: str, param: str) -> torch.Tensor:
        """dW of `adapter` on `param`, in the parameter's layout, dtype and device."""
        weight = self.base_param(param)
        a, b = self.lora_weights(adapter, param)
        dw = delta(a.float(), b.float(), self.scaling[adapter][param], weight, self.transposed)
        return dw.to(weight.device, weight.dtype)

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Add the adapters' dW into the base parameters in place."""
        names = [n for n in adapter_names or self.active_adapters if n in self.r]
        names = [n for n in dict.fromkeys(names) if n not in self.merged_adapters]
        for name in names:
            for param in self.r[name]:
                weight = self.base_param(param)
                merged = weight.float() + self.delta_weight(name, param).float()
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"merging adapter `{name}` produced non-finite weights")
                weight.copy_(merged.to(weight.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self, adapter_names: list[str] | None = None) -> None:
        """Take merged adapters out of the base parameters, newest first."""
        chosen = [n for n in self.merged_adapters if adapter_names is None or n in adapter_names]
        for name in chosen[::-1]:
            for param in self.r[name]:
                weight = self.base_param(param)
                weight.copy_(
                    (weight.float() - self.delta_weight(name, param).float()).to(weight.dtype)
                )
        self.merged_adapters = [n for n in self.merged_adapters if n not in chosen]

    def unwrap(self, names: list[str], *, merge: bool, safe_merge: bool = False) -> nn.Module:
        """The base module, with adapters `names` merged in when `merge`."""
        if merge:
            self.merge(names, safe_merge=safe_merge)
        else:
            self.unmerge()
        return self.base_layer

    def extra_repr(self) -> str:
        return f"parameters={self.param_names()}, adapters={list(self.r)}"


def _take_rows(result, out, keep: list[int], rows: int):
    """`result` with rows `keep` taken from `out` (tensors or tuples of them), where a tensor's
    first dimension is the batch's rows or its tokens (rows × positions, flattened row-major)."""
    if isinstance(result, tuple):
        return tuple(_take_rows(r, o, keep, rows) for r, o in zip(result, out, strict=True))
    if not isinstance(result, torch.Tensor) or result.dim() == 0 or torch.equal(result, out):
        return result
    n = result.shape[0]
    if n % rows:
        raise ConfigError(
            f"per-row adapters: an output of {n} tokens does not split into the batch's {rows} "
            "rows; run one adapter per batch on this model"
        )
    mask = torch.zeros(rows, dtype=torch.bool, device=result.device)
    mask[keep] = True
    mask = mask.repeat_interleave(n // rows).view(n, *([1] * (result.dim() - 1)))
    return torch.where(mask, out, result)


def check_param_config(config, key: str) -> None:
    """Refuse what peft refuses for LoRA on a parameter; the error names the parameter."""
    problems = {
        "lora_dropout": config.lora_dropout != 0,
        "use_dora": config.use_dora,
        "fan_in_fan_out": config.fan_in_fan_out,
        "lora_bias": getattr(config, "lora_bias", False),
    }
    for field, bad in problems.items():
        if bad:
            raise ConfigError(
                f"LoRA on parameter `{key}` does not work with {field}={getattr(config, field)!r} "
                "(as in peft: the update is a change of the weight itself); set "
                f"{field}={False if field != 'lora_dropout' else 0} or leave the parameter out"
            )
    init = config.init_lora_weights
    if isinstance(init, str) and init != "gaussian":
        raise ConfigError(
            f"LoRA on parameter `{key}` does not support init_lora_weights={init!r}; use True, "
            "'gaussian' or False"
        )
