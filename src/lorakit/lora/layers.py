"""`LoraLinear`: a base layer plus named low-rank adapters.

For a base weight W (out × in), adapter `a` adds `scaling_a * B_a @ A_a` with
A_a (r × in), B_a (out × r), scaling_a = lora_alpha / r (`config.scaling`), so the forward is

    y = base(x) + scaling_a * B_a(A_a(dropout_a(x)))

summed over the active adapters. A transformers `Conv1D` stores W as (in × out)
(`fan_in_fan_out`); `LoraEmbedding` wraps an `nn.Embedding`, whose A (r × num_embeddings) is
looked up by token id. The update and merging are in `update.py`. With a per-row plan set
(`set_rows`), each batch row gets only its own adapter, by the faster paths of `rows.py` and
`fused.py`. A DoRA adapter (`use_dora`) also has a magnitude per output row (see `dora.py`);
PiSSA / OLoRA / LoftQ initialise from the base weight and change it (see `inits.py`). Layers
that read the same input (q, k, v; gate, up) share one dropout mask on it (`shared.py`).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import ConfigError
from lorakit.lora import dora, inits, rows, shared, update
from lorakit.lora.config import scaling
from lorakit.lora.rows import RowPlan

LINEAR, CONV1D, EMBEDDING = "linear", "conv1d", "embedding"
CONVND, MHA = "convnd", "mha"  # nn.Conv1d/2d/3d (`conv.py`), nn.MultiheadAttention (`mha.py`)
logger = logging.getLogger("lorakit")


def layer_kind(module: nn.Module) -> str | None:
    """'linear', 'conv1d', 'embedding', 'convnd', 'mha', or None when LoRA cannot wrap `module`."""
    if isinstance(module, LoraLinear):
        return module.kind
    if isinstance(module, nn.Linear):
        return LINEAR
    if isinstance(module, nn.Embedding):
        return EMBEDDING
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return CONVND
    if isinstance(module, nn.MultiheadAttention):
        return MHA
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return CONV1D
    if is_quantized_linear(module):
        return LINEAR
    return None


def is_quantized_linear(module: nn.Module) -> bool:
    """A linear layer that stores its weight in another form and offers `dequantize()`."""
    return all(hasattr(module, a) for a in ("in_features", "out_features", "dequantize")) and (
        not isinstance(getattr(module, "weight", None), nn.Parameter)
    )


class LoraLinear(nn.Module):
    """Wraps `nn.Linear`, GPT-2 `Conv1D` or a quantized linear with adapters.

    `LoraLinear(embedding)` gives a `LoraEmbedding`."""

    no_dora: str | None = None  # why this kind of layer refuses DoRA, or None
    kinds: tuple[str, ...] = (LINEAR, CONV1D, EMBEDDING)  # the `layer_kind`s this class wraps

    def __new__(cls, base_layer: nn.Module | None = None, *args, **kwargs):
        if cls is LoraLinear and isinstance(base_layer, nn.Embedding):
            cls = LoraEmbedding
        return super().__new__(cls)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        kind = layer_kind(base_layer)
        if kind not in self.kinds:
            where = "" if kind is None else f" in a {type(self).__name__}"
            raise TypeError(f"LoRA cannot wrap {type(base_layer).__name__}{where}")
        self.base_layer = base_layer
        self.kind = kind
        self.fan_in_fan_out = kind in (CONV1D, EMBEDDING)  # the base stores W as (in, out)
        self.in_features, self.out_features = self._in_out(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA's m (out,) per adapter
        self.dora_norm_cache: dict[str, torch.Tensor] | None = None  # see dora.cached_weight_norms
        self.dora_merged_norms: dict[str, torch.Tensor] = {}  # DoRA's n at merge time, for unmerge
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self._rows: RowPlan | None = None

    def _in_out(self, base_layer: nn.Module) -> tuple[int, int]:
        """(in_features, out_features) of the base layer."""
        if self.fan_in_fan_out:
            return tuple(base_layer.weight.shape)
        return base_layer.in_features, base_layer.out_features

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters and self.merged_adapters:
            self.unmerge()
        if self._rows is not None and not self.disable_adapters:
            return rows.forward(self, x, *args, **kwargs)  # per-row adapters, fast paths: rows.py
        result = self.base_layer(x, *args, **kwargs)
        for name in self._running():
            # result + self._delta(x, name, result), i.e. + scaling * B(A(dropout(x))), with B's
            # matmul and the add fused into one addmm: half the adapter's cost at inference
            result = rows.add_adapter(self, result, x, name)
        return result

    def _running(self) -> list[str]:
        """The adapters the forward adds: active, present here and not merged."""
        if self.disable_adapters:
            return []
        return [n for n in self.active_adapters if n in self.r and n not in self.merged_adapters]

    def _delta(self, x: torch.Tensor, name: str, result: torch.Tensor) -> torch.Tensor:
        """scaling * B(A(dropout(x))), computed in the adapter's dtype, returned in `result`'s;
        DoRA's term instead, which reads `result` = base(x) (see `dora.py`)."""
        if name in self.lora_magnitude_vector:
            return dora.dora_delta(self, x, result, name).to(result.dtype)
        a, b = self.lora_weights(name)
        x, factor = shared.dropped(self, x, name)  # dropout(x) = factor * x now
        h = F.linear(x.to(a.dtype), a) * (self.scaling[name] * factor)  # (..., r)
        return F.linear(h, b).to(result.dtype)  # (..., out)

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
        """Add (or replace) adapter `adapter_name` of rank r."""
        if use_dora and self.no_dora is not None:
            raise ConfigError(self.no_dora)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = scaling(lora_alpha, r, use_rslora)
        self.lora_dropout[adapter_name] = (
            nn.Dropout(lora_dropout) if lora_dropout else nn.Identity()
        )
        self._create_weights(adapter_name, r, *self._adapter_placement())
        if inits.is_mutating(init_lora_weights):
            inits.initialise(self, adapter_name, init_lora_weights, loftq_config)
        else:
            self.reset_lora_parameters(adapter_name, init_lora_weights)
        if adapter_name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter_name]
        if use_dora:
            magnitude = dora.initial_magnitude(self, adapter_name)
            self.lora_magnitude_vector[adapter_name] = nn.Parameter(magnitude)
        if adapter_name not in self.active_adapters and not self.active_adapters:
            self.active_adapters = [adapter_name]

    def _create_weights(self, name: str, r: int, device, dtype: torch.dtype) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, r, False, device, dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, False, device, dtype)

    @torch.no_grad()
    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: bool | str) -> None:
        """True: A kaiming-uniform, B zero. 'gaussian': A ~ N(0, 1/r), B zero.
        False: both random."""
        a, b = self.lora_weights(adapter_name)
        if init_lora_weights == "gaussian":
            nn.init.normal_(a, std=1 / self.r[adapter_name])
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init_lora_weights is False:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        else:
            nn.init.zeros_(b)

    def lora_weights(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of an adapter: A (r × in), B (out × r)."""
        return self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove adapter `adapter_name` (unmerging it first if merged)."""
        if adapter_name in self.merged_adapters:
            self.unmerge([adapter_name])
        for container in (
            self.lora_A,
            self.lora_B,
            self.lora_embedding_A,
            self.lora_embedding_B,
            self.lora_dropout,
            self.lora_magnitude_vector,
        ):
            if adapter_name in container:
                del container[adapter_name]
        for table in (self.r, self.lora_alpha, self.scaling):
            table.pop(adapter_name, None)
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        """Make these adapters this layer's active ones (`LoraModel.set_adapter` sets all)."""
        self.active_adapters = [adapter_names] if isinstance(adapter_names, str) else adapter_names

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """peft's name for `delta_weight`, in the base weight's dtype."""
        weight = self._base_weight()
        delta = self.delta_weight(adapter)
        return (
            delta.to(weight.dtype) if weight is not None and weight.is_floating_point() else delta
        )

    @torch.no_grad()
    def cast_adapter_to_base(self, adapter_name: str) -> None:
        """Store adapter `adapter_name` in the base weight's float dtype (fp16 / bf16 bases)."""
        weight = self._base_weight()
        if adapter_name not in self.r or weight is None or not weight.is_floating_point():
            return
        for container in (self.lora_A, self.lora_B):
            if adapter_name in container:
                container[adapter_name].to(weight.dtype)
        for table in (self.lora_embedding_A, self.lora_embedding_B, self.lora_magnitude_vector):
            if adapter_name in table:
                table[adapter_name].data = table[adapter_name].data.to(weight.dtype)

    @property
    def packable(self) -> bool:
        """Whether `rows.PackedAdapters` may pack this layer (no DoRA or merged adapters)."""
        return not (self.merged_adapters or self.lora_magnitude_vector)

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """The trainable tensors of an adapter: A, B and, for DoRA, the magnitude."""
        params = list(self.lora_weights(adapter_name))
        if adapter_name in self.lora_magnitude_vector:
            params.append(self.lora_magnitude_vector[adapter_name])
        return params

    def set_rows(self, plan: RowPlan | None) -> None:
        """Per-row adapters for the next forwards (None: the active adapters for every row)."""
        self.__dict__["_rows"] = plan  # a plain attribute: skip nn.Module's slower __setattr__

    # ---------------------------------------------------------------- merging
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """scaling * B @ A in the base weight's layout: (out, in), (in, out) for fan_in_fan_out."""
        return self._layout(update.scaled_update(self, adapter_name))

    def _layout(self, weight: torch.Tensor) -> torch.Tensor:
        """An (out, in) weight in the base's layout, or the base's weight as (out, in)."""
        return weight.T if self.fan_in_fan_out else weight

    def _adapter_placement(self) -> tuple[torch.device | None, torch.dtype]:
        """Adapters live on the base layer's device, in fp32 unless the base is fp32/fp64."""
        tensor = next(iter(self.base_layer.parameters()), None)
        tensor = tensor if tensor is not None else next(iter(self.base_layer.buffers()), None)
        device = tensor.device if tensor is not None else None
        weight = self._base_weight()
        keep = weight is not None and weight.dtype in (torch.float32, torch.float64)
        return device, weight.dtype if keep else torch.float32

    def _base_weight(self) -> torch.Tensor | None:
        weight = getattr(self.base_layer, "weight", None)
        return weight if isinstance(weight, torch.Tensor) else None

    def dense_weight(self) -> torch.Tensor:
        """The base weight W as (out, in), dequantized for a quantized base."""
        weight = self._base_weight()
        if weight is None or not weight.is_floating_point():
            return self.base_layer.dequantize()
        return self._layout(weight)

    @torch.no_grad()
    def set_dense_weight(self, weight: torch.Tensor) -> None:
        """Store `weight` (out, in) as the base weight, in its own layout and dtype."""
        base = self._base_weight()
        if base is None or not base.is_floating_point():
            self.base_layer.store(weight)  # a quantized base quantizes it (QuantLinear.store)
            return
        base.copy_(self._layout(weight).to(base.dtype))

    @torch.no_grad()
    def merged_delta(self, adapter_names: list[str]) -> torch.Tensor | None:
        """What merging these adapters adds to the (out, in) base weight, or None for nothing."""
        names = [n for n in adapter_names if n in self.r and n not in self.merged_adapters]
        if not names:
            return None
        unmerged = self.dense_weight().float()
        return update.merged_weight(self, names, unmerged)[0] - unmerged

    def check_merge(self, adapter_names: list[str]) -> None:
        """Raise, before anything is written, when these adapters cannot merge into this layer
        (every linear layer can; see `conv.LoraConv`)."""

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Write the adapters into the base weight in place (DoRA: see `dora.py`)."""
        weight = self._base_weight()
        if weight is None or not weight.is_floating_point():
            raise TypeError(
                f"cannot merge in place into a {type(self.base_layer).__name__} base; "
                "use merge_and_unload(), which dequantizes first"
            )
        names = [n for n in adapter_names or self.active_adapters if n in self.r]
        names = [n for n in dict.fromkeys(names) if n not in self.merged_adapters]
        if not names:
            return
        if self.merged_adapters and any(n in self.lora_magnitude_vector for n in names):
            earlier = list(self.merged_adapters)  # DoRA's norm needs the unmerged weight
            self.unmerge()
            names = earlier + names
        merged, norms = update.merged_weight(self, names, self.dense_weight().float(), safe_merge)
        self.set_dense_weight(merged)
        self.dora_merged_norms.update(norms)
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self, adapter_names: list[str] | None = None) -> None:
        """Take merged adapters out of the base weight, newest first."""
        if not self.merged_adapters:
            return
        chosen = [n for n in self.merged_adapters if adapter_names is None or n in adapter_names]
        names = chosen[::-1]
        self.set_dense_weight(update.unmerged_weight(self, names, self.dense_weight().float()))
        self.merged_adapters = [n for n in self.merged_adapters if n not in names]

    def unwrap(self, names: list[str], *, merge: bool, safe_merge: bool = False) -> nn.Module:
        """The base layer, with adapters `names` merged in when `merge` (a quantized base is
        dequantized, merged and quantized again, `quant.merge_into_quantized`)."""
        base = self.base_layer
        if not merge:
            self.unmerge()
            return base
        weight = getattr(base, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            self.merge(names, safe_merge=safe_merge)
            return base
        from lorakit.quant.layer import merge_into_quantized

        delta = self.merged_delta(names)
        if delta is None:
            return base
        if safe_merge and not torch.isfinite(delta).all():
            raise ValueError("merging produced non-finite weights; not merged")
        merged, message = merge_into_quantized(base, delta)
        logger.info(message)
        return merged

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={r}" for n, r in self.r.items())
        return f"kind={self.kind}, adapters=[{ranks}], active={self.active_adapters}"


class LoraEmbedding(LoraLinear):
    """Wraps an `nn.Embedding` (num_embeddings = in, embedding_dim = out) with adapters.

    A (r × num_embeddings) is looked up by token id, as the base looks up its weight, so the
    forward adds scaling * B(embedding(x, A^T)); no dropout. The parameters keep peft's names,
    `lora_embedding_A` and `lora_embedding_B`. DoRA scales both the base's and the adapter's
    output by m / n, n the norm of each embedding dimension's column of W + dW (peft's form,
    `dora.py`'s norm on the (dim, num_embeddings) view). The inits that read the base weight
    are not supported here."""

    def _create_weights(self, name: str, r: int, device, dtype: torch.dtype) -> None:
        self.lora_embedding_A[name] = nn.Parameter(
            torch.empty(r, self.in_features, device=device, dtype=dtype)
        )
        self.lora_embedding_B[name] = nn.Parameter(
            torch.empty(self.out_features, r, device=device, dtype=dtype)
        )

    @torch.no_grad()
    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: bool | str) -> None:
        """A zero, B normal (the roles swap, as A is looked up); False: both normal."""
        a, b = self.lora_weights(adapter_name)
        nn.init.normal_(b)
        if init_lora_weights is False:
            nn.init.normal_(a)
        else:
            nn.init.zeros_(a)

    def lora_weights(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of an adapter: A (r × num_embeddings), B (embedding_dim × r)."""
        return self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]

    def _delta(self, x: torch.Tensor, name: str, result: torch.Tensor) -> torch.Tensor:
        """scaling * B(embedding(x, A^T)) in `result`'s dtype; x holds token ids."""
        a, b = self.lora_weights(name)
        base = self.base_layer
        h = F.embedding(
            x,
            a.T,
            base.padding_idx,
            base.max_norm,
            base.norm_type,
            base.scale_grad_by_freq,
            base.sparse,
        )
        lora = h @ b.T * self.scaling[name]  # (..., dim)
        if name in self.lora_magnitude_vector:  # DoRA: (m / n) * (base + lora) - base
            weight = self.dense_weight().to(a.dtype)
            scale = self.lora_magnitude_vector[name] / dora.weight_norm(self, name, weight)
            return ((scale - 1) * result.to(a.dtype) + scale * lora).to(result.dtype)
        return lora.to(result.dtype)

    @property
    def packable(self) -> bool:
        """Never: packed rows and fused groups are for linear layers."""
        return False


class ModulesToSave(nn.Module):
    """A trainable copy of a whole module per adapter (peft's `modules_to_save`)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disable_adapters = False
        self._rows: RowPlan | None = None

    def add_copy(self, adapter_name: str) -> None:
        """A trainable deep copy of the original module for `adapter_name`."""
        import copy

        module = copy.deepcopy(self.original_module)
        for param in module.parameters():
            param.requires_grad_(True)
        self.modules_to_save[adapter_name] = module
        if not self.active_adapters:
            self.active_adapters = [adapter_name]

    def set_rows(self, plan: RowPlan | None) -> None:
        """Per-row adapters, as in `LoraLinear.set_rows` (always as grouped rows)."""
        self._rows = plan

    def active_module(self) -> nn.Module:
        """The module that runs now: the active adapter's copy, or the original when the
        adapters are disabled or none of the active ones has a copy here."""
        active = [a for a in self.active_adapters if a in self.modules_to_save]
        if self.disable_adapters or not active:
            return self.original_module
        return self.modules_to_save[active[0]]

    def __getattr__(self, name: str):
        """Attributes the wrapper lacks (`weight`, `in_features`, ...) are the running module's,
        as in peft, so `model.lm_head.weight` works with `modules_to_save=["lm_head"]`."""
        if "_modules" not in self.__dict__:
            raise AttributeError(name)
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.active_module(), name)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        if self._rows is None:
            return self.active_module()(*args, **kwargs)
        if not args:
            raise TypeError(
                "per-row adapters need the module's input as its first positional argument"
            )
        x, rest = args[0], args[1:]
        result = self.original_module(x, *rest, **kwargs)
        for name, indices, _ in self._rows.groups:
            if name in self.modules_to_save:
                own = self.modules_to_save[name](x.index_select(0, indices), *rest, **kwargs)
                result = result.index_copy(0, indices, own.to(result.dtype))
        return result
