"""`layer_replication`: a deeper model from repeated decoder layers that share their weights.

`layer_replication=[[0, 4], [2, 5]]` on a model with layers 0..4 stacks the ranges (start
included, end excluded, mergekit's passthrough convention) into 7 layers, `[0, 1, 2, 3, 2, 3, 4]`.
Each copy is a new module whose parameters are the original layer's (no memory for the copy),
so the copies of one layer compute the same until LoRA is added: each copy then gets its own
adapters. The layers are found as peft finds them: `model[.model...].layers`, `.bert.encoder.layer`
or `.h`; `config.num_hidden_layers` and each attention's `layer_idx` (its KV-cache slot) follow
the new order. The model is replicated once, before its first adapter is injected; later
adapters must name the same ranges (or none).

Merging writes an adapter into a weight the copies share, so `unshare` first gives each copy
its own weights: a merged model is the deeper model, with `num_hidden_layers` layers.
"""

from __future__ import annotations

import copy

from torch import nn

from lorakit.errors import ConfigError

_MARK = "_lorakit_layer_replication"  # the ranges a model was replicated with


def check_layer_map(value) -> bool:
    """Whether `value` is a list of [start, end) pairs of integers with 0 <= start < end."""
    if value is None:
        return True
    if not isinstance(value, (list, tuple)):
        return False
    for pair in value:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            return False
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in pair):
            return False
        if not 0 <= pair[0] < pair[1]:
            return False
    return True


def layer_list(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(owner, attribute, the decoder layers) as peft locates them, or a `ConfigError`."""
    inner = model
    while hasattr(inner, "model") and isinstance(inner.model, nn.Module):
        inner = inner.model
    if hasattr(inner, "bert"):
        inner = inner.bert
    for owner, attribute in ((inner, "layers"), (getattr(inner, "encoder", None), "layer")):
        layers = getattr(owner, attribute, None) if owner is not None else None
        if isinstance(layers, nn.ModuleList):
            return owner, attribute, layers
    if isinstance(getattr(inner, "h", None), nn.ModuleList):
        return inner, "h", inner.h
    raise ConfigError(
        f"layer_replication: no list of decoder layers found in {type(model).__name__} (looked "
        "for model.layers, bert.encoder.layer and h, as peft does); leave layer_replication unset"
    )


def replicate(model: nn.Module, layer_map: list[list[int]], adapted: bool = False) -> None:
    """Replicate `model`'s layers by `layer_map` in place, once (see the module text).
    `adapted`: the model has adapters already (then it must have been replicated so)."""
    layer_map = [list(pair) for pair in layer_map]
    done = getattr(model, _MARK, None)
    if done is not None:
        if done != layer_map:
            raise ConfigError(
                f"layer_replication={layer_map}: this model's layers were replicated with "
                f"{done}; every adapter on it must give the same ranges (or none)"
            )
        return
    if adapted:
        raise ConfigError(
            f"layer_replication={layer_map}: this model has adapters on its layers as they are; "
            "replicating now would share those adapters between the copies. Give "
            "layer_replication to the first adapter (or load this one on a fresh base)"
        )
    owner, attribute, layers = layer_list(model)
    too_far = [pair for pair in layer_map if pair[1] > len(layers)]
    if too_far:
        raise ConfigError(
            f"layer_replication={layer_map}: range {too_far[0]} reaches past the model's "
            f"{len(layers)} layers; ranges are [start, end) with end <= {len(layers)}"
        )
    copies = []
    for start, end in layer_map:
        for index in range(start, end):
            copies.append(_shared_copy(layers[index], len(copies)))
    setattr(owner, attribute, nn.ModuleList(copies))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(copies)
    object.__setattr__(model, _MARK, layer_map)


def _shared_copy(layer: nn.Module, index: int) -> nn.Module:
    """A copy of `layer` whose parameters are `layer`'s own tensors; `layer_idx` = index."""
    clone = copy.deepcopy(layer)
    for name, module in layer.named_modules():
        target = clone.get_submodule(name)
        for param_name, param in module.named_parameters(recurse=False):
            target.register_parameter(param_name, param)
    for module in clone.modules():
        if hasattr(module, "layer_idx"):
            module.layer_idx = index
    return clone


def replicated_map(model: nn.Module) -> list[list[int]] | None:
    """The ranges `model` was replicated with, or None."""
    return getattr(model, _MARK, None)


def unshare(model: nn.Module) -> int:
    """Give every parameter the replicated layers share its own copy (before a merge); returns
    how many were copied."""
    if replicated_map(model) is None:
        return 0
    _, _, layers = layer_list(model)
    seen: set[int] = set()
    copied = 0
    for layer in layers:
        for module in layer.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if id(param) not in seen:
                    seen.add(id(param))
                    continue
                fresh = nn.Parameter(param.detach().clone(), param.requires_grad)
                module.register_parameter(name, fresh)
                seen.add(id(fresh))
                copied += 1
    return copied
