"""Trainable tokens (`trainable_token_indices`): chosen rows of an embedding train, the rest stay.

For each adapter, `TrainableTokens` holds the new values of the chosen rows (peft's
`trainable_tokens_delta`: the rows themselves, not a difference, made as copies of the base
rows) and the original rows (for unmerging). The forward reads the base layer, then puts the
adapter's rows in place: for an `nn.Embedding` the looked-up vectors of those token ids, for an
`nn.Linear` output head the logits of those ids (`x @ row + bias`). Merging writes the rows
into the base weight.

`trainable_token_indices` is a list of ids (the model's input embedding) or a dict
{layer name: ids}. A head tied to the input embedding (`tie_word_embeddings`) gets a wrapper
that shares the embedding's rows (peft's tying, kept with or without `ensure_weight_tying`);
a dict giving a tied head other ids than the embedding treats them as two layers, except with
`ensure_weight_tying=True`, which refuses it. File key: `<layer>.token_adapter.
trainable_tokens_delta` (a tied head writes none), as peft writes it.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import ConfigError

if TYPE_CHECKING:
    from lorakit.lora.config import LoraConfig
    from lorakit.lora.rows import RowPlan

DELTA = "token_adapter.trainable_tokens_delta"


class _Originals(nn.Module):
    """The base rows each adapter replaces, as buffers that follow the layer's device and dtype
    (not saved: the base holds them)."""

    def add(self, name: str, rows: torch.Tensor) -> None:
        self.register_buffer(name, rows, persistent=False)

    def get(self, name: str) -> torch.Tensor:
        return self._buffers[name]

    def remove(self, name: str) -> None:
        del self._buffers[name]


class TokenAdapter(nn.Module):
    """The base layer and the per-adapter rows (peft's `token_adapter` names)."""

    def __init__(self, base_layer: nn.Module, tied_to: TokenAdapter | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        if tied_to is None:
            self.trainable_tokens_delta = nn.ParameterDict()
            self.trainable_tokens_original = _Originals()
            self.token_indices: dict[str, list[int]] = {}
        else:  # the same objects: the head reads and trains the embedding's rows
            self.trainable_tokens_delta = tied_to.trainable_tokens_delta
            self.trainable_tokens_original = tied_to.trainable_tokens_original
            self.token_indices = tied_to.token_indices


class TrainableTokens(nn.Module):
    """An `nn.Embedding` or `nn.Linear` whose chosen rows are trained per adapter."""

    def __init__(self, base_layer: nn.Module, tied_to: TrainableTokens | None = None) -> None:
        super().__init__()
        if not isinstance(base_layer, (nn.Embedding, nn.Linear)):
            raise ConfigError(
                f"trainable_token_indices: a {type(base_layer).__name__} has no token rows; "
                "name an nn.Embedding (or a linear output head)"
            )
        self.token_adapter = TokenAdapter(base_layer, tied_to and tied_to.token_adapter)
        self._tied = [tied_to] if tied_to is not None else []  # not a submodule
        self.active_adapters: list[str] = []
        self.disable_adapters = False
        self.merged_adapters: list[str] = []
        self._rows: RowPlan | None = None

    @property
    def base_layer(self) -> nn.Module:
        return self.token_adapter.base_layer

    @property
    def tied(self) -> bool:
        """Whether this wrapper reads another's rows (a tied head)."""
        return bool(self._tied)

    @property
    def trainable_tokens_delta(self) -> nn.ParameterDict:
        return self.token_adapter.trainable_tokens_delta

    @property
    def token_indices(self) -> dict[str, list[int]]:
        return self.token_adapter.token_indices

    def __getattr__(self, name: str) -> Any:
        """`weight` is the weight the forward uses (the adapter's rows in place), as in peft;
        other attributes (`num_embeddings`, `embedding_dim`, ...) are the base layer's."""
        if "_modules" not in self.__dict__:
            raise AttributeError(name)
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or name == "token_adapter":
                raise
            if name == "weight":
                return self.merged_weight(self._running())
            return getattr(self.token_adapter.base_layer, name)

    # ---------------------------------------------------------------- adapters
    def add(self, adapter_name: str, indices: list[int]) -> None:
        """Rows `indices` of the base weight become trainable for `adapter_name`, starting at
        their base values (an untrained adapter changes nothing)."""
        if not self.tied:
            weight = self.base_layer.weight
            rows = weight.detach()[torch.tensor(indices, dtype=torch.long, device=weight.device)]
            self.token_indices[adapter_name] = list(indices)
            self.trainable_tokens_delta[adapter_name] = nn.Parameter(rows.clone())
            self.token_adapter.trainable_tokens_original.add(adapter_name, rows.clone())
        if not self.active_adapters:
            self.active_adapters = [adapter_name]

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            self.unmerge()
        if not self.tied and adapter_name in self.trainable_tokens_delta:
            del self.trainable_tokens_delta[adapter_name]
            self.token_adapter.trainable_tokens_original.remove(adapter_name)
            del self.token_indices[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        held = adapter_name in self.trainable_tokens_delta
        return [self.trainable_tokens_delta[adapter_name]] if held else []

    def set_rows(self, plan: RowPlan | None) -> None:
        """Per-row adapters, as in `LoraLinear.set_rows`."""
        self._rows = plan

    def _running(self) -> list[str]:
        if self.disable_adapters:
            return []
        held = self.trainable_tokens_delta
        names = [n for n in self.active_adapters if n in held and n not in self.merged_adapters]
        _check_disjoint(self.token_indices, names + self.merged_adapters)
        return names

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters and self.merged_adapters:
            self.unmerge()
        if self._rows is None or self.disable_adapters:
            return self._with_rows(x, self._running(), args, kwargs)
        result = self._with_rows(x, [], args, kwargs)
        for name, indices, _ in self._rows.groups:
            if name in self.trainable_tokens_delta and name not in self.merged_adapters:
                own = self._with_rows(x.index_select(0, indices), [name], args, kwargs)
                result = result.index_copy(0, indices, own.to(result.dtype))
        return result

    def _with_rows(self, x: torch.Tensor, names: list[str], args, kwargs) -> torch.Tensor:
        """The base layer's output with the rows of adapters `names` in place."""
        base = self.base_layer
        result = base(x, *args, **kwargs)
        for name in names:
            index = torch.tensor(self.token_indices[name], dtype=torch.long, device=x.device)
            rows = self.trainable_tokens_delta[name]
            if isinstance(base, nn.Embedding):
                result = _embedding_rows(base, x, result, index, rows)
            else:
                bias = None if base.bias is None else base.bias[index]
                own = F.linear(x, rows.to(x.dtype), None if bias is None else bias.to(x.dtype))
                result = result.index_copy(result.dim() - 1, index, own.to(result.dtype))
        return result

    # ---------------------------------------------------------------- merging
    def merged_weight(self, names: list[str]) -> torch.Tensor:
        """The base weight with the rows of adapters `names` in place (a new tensor)."""
        weight = self.base_layer.weight
        for name in names:
            index = torch.tensor(self.token_indices[name], device=weight.device)
            weight = weight.index_copy(0, index, self.trainable_tokens_delta[name].to(weight))
        return weight

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Write the adapters' rows into the base weight (a tied head: its embedding does)."""
        names = adapter_names or self.active_adapters
        names = [n for n in dict.fromkeys(names) if n in self.trainable_tokens_delta]
        names = [n for n in names if n not in self.merged_adapters]
        if self.tied:  # the embedding's wrapper writes the shared weight
            self.merged_adapters.extend(names)
        if self.tied or not names:
            return
        _check_disjoint(self.token_indices, self.merged_adapters + names)
        merged = self.merged_weight(names)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError("merging produced non-finite weights; not merged")
        self.base_layer.weight.data.copy_(merged)
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self, adapter_names: list[str] | None = None) -> None:
        """Put the base rows back, newest adapter first."""
        weight = self.base_layer.weight
        chosen = [n for n in self.merged_adapters if adapter_names is None or n in adapter_names]
        for name in reversed([] if self.tied else chosen):
            index = torch.tensor(self.token_indices[name], device=weight.device)
            original = self.token_adapter.trainable_tokens_original.get(name)
            weight.data.index_copy_(0, index, original.to(weight))
        self.merged_adapters = [n for n in self.merged_adapters if n not in chosen]

    def unwrap(self, names: list[str], *, merge: bool, safe_merge: bool = False) -> nn.Module:
        """The base layer, with adapters `names`' rows written in when `merge`."""
        if merge:
            self.merge(names, safe_merge=safe_merge)
        else:
            self.unmerge()
        return self.base_layer

    def extra_repr(self) -> str:
        shown = {n: len(i) for n, i in self.token_indices.items()}
        return f"rows={shown}" + (", tied" if self.tied else "")


def _embedding_rows(
    base: nn.Embedding, x: torch.Tensor, result: torch.Tensor, index: torch.Tensor, rows
) -> torch.Tensor:
    """`result` (the embedding of ids `x`) with the vectors of ids `index` taken from `rows`
    (times the layer's `embed_scale`, where it has one)."""
    where = torch.full((base.num_embeddings,), -1, dtype=torch.long, device=x.device)
    where[index] = torch.arange(len(index), device=x.device)
    slot = where[x]
    hit = slot >= 0
    picked = rows[slot.clamp(min=0)]
    scale = getattr(base, "embed_scale", None)
    if scale is not None:
        picked = picked * torch.as_tensor(scale, device=picked.device, dtype=picked.dtype)
    return torch.where(hit.unsqueeze(-1), picked.to(result.dtype), result)


def _check_disjoint(indices: dict[str, list[int]], names: list[str]) -> None:
    seen: set[int] = set()
    for name in dict.fromkeys(names):
        mine = set(indices.get(name, []))
        if seen & mine:
            raise ValueError(
                f"Token indices of adapter {name} are already defined and would result in "
                "undefined merging behavior. Only disjunct token indices are currently supported "
                f"(ids {sorted(seen & mine)[:8]} are trained by two active adapters)."
            )
        seen |= mine


# ----------------------------------------------------------------- choosing the layers


def layer_name(model: nn.Module, module: nn.Module | None) -> str | None:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    return None


def input_embedding(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_input_embeddings", None)
    found = getter() if callable(getter) else None
    return found if isinstance(found, nn.Module) else None


def head_layer(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    found = getter() if callable(getter) else None
    return found if isinstance(found, nn.Module) else None


def _tied_head(model: nn.Module) -> str | None:
    """The name of the output head that shares the input embedding's weight, if any."""
    embedding, head = input_embedding(model), head_layer(model)
    if embedding is None or head is None or head is embedding:
        return None
    if isinstance(embedding, TrainableTokens):
        embedding = embedding.base_layer
    if isinstance(head, TrainableTokens):
        head = head.base_layer
    weight = getattr(embedding, "weight", None)
    if weight is None or getattr(head, "weight", None) is not weight:
        return None
    return layer_name(model, head_layer(model))


def token_layers(model: nn.Module, config: LoraConfig) -> dict[str, list[int]]:
    """{full layer name: token ids} that `config.trainable_token_indices` trains, tied heads
    left out (`tied_heads` gives them)."""
    wanted = config.trainable_token_indices
    if not wanted:
        return {}
    if not isinstance(wanted, dict):
        name = layer_name(model, input_embedding(model))
        wanted = {"embed_tokens" if name is None else name: list(wanted)}
    names = [n for n, _ in model.named_modules()]
    found = {}
    for key, ids in wanted.items():
        hits = [n for n in names if n == key or n.endswith("." + key)]
        hits = [n for n in hits if ".token_adapter" not in n]
        if not hits:
            raise ConfigError(
                f"trainable_token_indices names `{key}`, which matches no module of "
                f"{type(model).__name__}; name the embedding layer (e.g. 'embed_tokens') or "
                "give a list of ids for the input embedding"
            )
        for hit in hits:
            found[hit] = list(ids)
    head = _tied_head(model)
    embedding = layer_name(model, input_embedding(model))
    if head in found and embedding in found:
        if found[head] == found[embedding]:
            del found[head]  # tied: the head reads the embedding's rows
        elif config.ensure_weight_tying:
            raise ConfigError(
                "Cannot ensure weight tying when different token indices are specified for tied "
                f"layers. Conflicting layers: {embedding}: {found[embedding]}, {head}: "
                f"{found[head]}. Please use the same indices for all tied layers or set "
                "ensure_weight_tying=False."
            )
    return found


def tied_heads(model: nn.Module, config: LoraConfig, layers: dict[str, list[int]]) -> list[str]:
    """The tied head that reads the embedding's rows, when the embedding is trained and the
    head is not trained on its own (peft ties it with or without `ensure_weight_tying`)."""
    head = _tied_head(model)
    if config.ensure_weight_tying and head is None:
        warnings.warn(
            "ensure_weight_tying=True but the model does not have tied weights "
            "(tie_word_embeddings=False). Weight tying will not be applied for "
            "trainable_token_indices.",
            stacklevel=4,
        )
    embedding = layer_name(model, input_embedding(model))
    return [head] if head and embedding in layers and head not in layers else []


def check_token_ids(model: nn.Module, layers: dict[str, list[int]]) -> None:
    """Every id names a row of its layer; else a ConfigError saying how to fix it."""
    for name, ids in layers.items():
        module = model.get_submodule(name)
        base = module.base_layer if isinstance(module, TrainableTokens) else module
        weight = getattr(base, "weight", None)
        rows = weight.shape[0] if isinstance(weight, torch.Tensor) else 0
        bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < rows]
        if bad or not ids:
            raise ConfigError(
                f"trainable_token_indices for `{name}`: "
                + (f"ids {bad[:8]} are not rows of its {rows}" if bad else "no ids given")
                + "; the ids must be rows of the layer: a token added to the tokenizer needs "
                "model.resize_token_embeddings(len(tokenizer)) first"
            )


def check_tokens(model: nn.Module, config: LoraConfig) -> None:
    """Refuse, before anything is wrapped, token ids that are not rows, a layer trained both
    whole (`modules_to_save`) or by LoRA and by rows, and `ensure_weight_tying` on LoRA or
    `modules_to_save` layers of a tied embedding (lorakit keeps only trainable tokens tied)."""
    from lorakit.lora.inject import find_targets

    layers = token_layers(model, config)
    check_token_ids(model, layers)
    saved = config.modules_to_save or []
    lora = [n for n, _ in find_targets(model, config)] if config.target_modules else []
    head, embedding = _tied_head(model), layer_name(model, input_embedding(model))
    for name in layers:
        if any(name == w or name.endswith("." + w) for w in saved):
            raise ConfigError(
                "The embedding layer is already marked to be trained fully, either specify "
                f'`modules_to_save=[..., "{name}", ...]` or `trainable_tokens={{"{name}": x}}` '
                "but not both."
            )
        if name in lora:
            raise ConfigError(
                f"`{name}` is both a LoRA target and in trainable_token_indices: LoRA and "
                "trainable tokens on one layer is not supported by lorakit; leave it out of "
                "target_modules (its rows train as tokens)"
            )
    tied = {head, embedding} if head else set()
    both = [n for n in lora if n in tied] + [
        w for w in saved if any(n == w or n.endswith("." + w) for n in tied if n)
    ]
    if config.ensure_weight_tying and both:
        raise ConfigError(
            f"ensure_weight_tying=True with {both} in target_modules / modules_to_save of a "
            "model whose embedding and head are tied: keeping LoRA or modules_to_save copies "
            "tied is not supported by lorakit; use trainable_token_indices, or "
            "ensure_weight_tying=False (the layers then train apart)"
        )


def add_token_adapters(model: nn.Module, config: LoraConfig, adapter_name: str) -> list[str]:
    """Wrap the layers of `config.trainable_token_indices` (and a tied head) in
    `TrainableTokens` with adapter `adapter_name` (checked by `check_tokens`); returns their
    names."""
    from lorakit.lora.inject import replace_module

    layers = token_layers(model, config)
    if not layers:
        return []
    heads = tied_heads(model, config, layers)
    for name, ids in layers.items():
        module = model.get_submodule(name)
        if not isinstance(module, TrainableTokens):
            if not isinstance(module, (nn.Embedding, nn.Linear)):
                raise ConfigError(
                    f"trainable_token_indices on `{name}`, a {type(module).__name__}: trainable "
                    "tokens on a layer that carries LoRA or is not an nn.Embedding / nn.Linear "
                    "is not supported by lorakit"
                )
            module = TrainableTokens(module)
            replace_module(model, name, module)
        module.add(adapter_name, ids)
    owner = input_embedding(model)
    for name in heads:
        module = model.get_submodule(name)
        if not isinstance(module, TrainableTokens):
            module = TrainableTokens(module, tied_to=owner)
            replace_module(model, name, module)
        module.add(adapter_name, [])
    return list(layers) + heads


def new_token_rows(
    model: nn.Module, ids: list[int], trained_whole: list[str] | None = None
) -> dict[str, list[int]] | None:
    """`trainable_token_indices` for tokens just added (ids `ids`): the input embedding's rows
    and, when the head is not tied to it, the head's rows too (its new rows are random: an
    adapter that left them out would not reproduce the trained model). Layers trained whole
    (`trained_whole`, modules_to_save) are left out."""
    embedding = layer_name(model, input_embedding(model))
    head = None if _tied_head(model) else layer_name(model, head_layer(model))
    wanted = [n for n in (embedding, head) if n]
    whole = trained_whole or []
    wanted = [n for n in wanted if not any(n == w or n.endswith("." + w) for w in whole)]
    return {n: list(ids) for n in wanted} or None


def token_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's rows under their file key names (no prefix); tied heads write none."""
    return {
        f"{name}.{DELTA}": module.trainable_tokens_delta[adapter_name]
        for name, module in model.named_modules()
        if isinstance(module, TrainableTokens)
        and not module.tied
        and adapter_name in module.trainable_tokens_delta
    }


def token_shapes(model: nn.Module, config: LoraConfig) -> dict[str, tuple[int, ...]]:
    """File keys and shapes of the rows `config` trains on `model` (model untouched)."""
    layers = token_layers(model, config)
    check_token_ids(model, layers)
    shapes = {}
    for name, ids in layers.items():
        module = model.get_submodule(name)
        weight = (module.base_layer if isinstance(module, TrainableTokens) else module).weight
        shapes[f"{name}.{DELTA}"] = (len(ids), weight.shape[1])
    return shapes
