"""Which LoRA layer class adapts which module: the one table every wrapping goes through.

A target module is wrapped by the first class that claims it:

1. the config's own mapping, `config._register_custom_module({MyLayer: MyLoraLayer})` (peft's
   call): a module that is an instance of `MyLayer` is wrapped by `MyLoraLayer`; this also
   replaces lorakit's class for a kind it knows (`{nn.Linear: MyLoraLinear}`);
2. lorakit's built-in rules (`BUILTIN`): `nn.Embedding` -> `LoraEmbedding`;
   `nn.Conv1d/2d/3d` -> `LoraConv`; `nn.MultiheadAttention` -> `LoraMHA`; the `out_proj` of an
   unadapted MultiheadAttention -> `LoraOutProj` (the attention reads its weight without
   calling it); `nn.Linear`, transformers' GPT-2 `Conv1D` and quantized linear layers ->
   `LoraLinear`. A rule is a module type or a function of (module, the module that holds it).

Every class is made the same way, peft's constructor call:

    layer_cls(module, adapter_name, config=config, r=r, lora_alpha=alpha, target_name=name)

and a second adapter on a wrapped module is added with
`layer.update_layer(adapter_name, r, lora_alpha=alpha, config=config, target_name=name)`.

The protocol of a layer class of one's own (peft's rules for custom LoRA layers):

- subclass `nn.Module` and `LoraLayer` (`class MyLora(nn.Module, LoraLayer)`, or subclass
  `LoraLinear` to reuse the linear forward), take `base_layer` and `adapter_name` first and
  call `LoraLayer.__init__(self, base_layer, **kwargs)` after `nn.Module.__init__`;
- keep the trainable tensors in `nn.ModuleDict` / `nn.ParameterDict` attributes whose names
  start with `lora_`, keyed by adapter name; a tensor `<path>.lora_X.<adapter>.weight` is saved
  as `<path>.lora_X.weight`, as peft saves it (`adapter_tensors`);
- a `forward` that reads `self.active_adapters`, `self.disable_adapters` and
  `self.merged_adapters`; `merge` / `unmerge` only if the layer should merge.

A custom layer is not saved in `adapter_config.json`: register the mapping again on the config
before loading (`LoraModel.from_pretrained(model, path, config=config)`), as with peft. Per-row
adapters (`mixed_adapters`) need lorakit's own forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lorakit.lora.conv import LoraConv
from lorakit.lora.layers import (
    CONV1D,
    LINEAR,
    LoraEmbedding,
    LoraLayer,
    LoraLinear,
    layer_kind,
)
from lorakit.lora.mha import LoraMHA, LoraOutProj, is_attention_out_proj

Match = type | Callable[[nn.Module, nn.Module | None], bool]
# (what a module must be, the class that wraps it), first match wins
BUILTIN: list[tuple[Match, type]] = [
    (nn.Embedding, LoraEmbedding),
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), LoraConv),
    (nn.MultiheadAttention, LoraMHA),
    (is_attention_out_proj, LoraOutProj),
    (lambda module, parent: layer_kind(module) in (LINEAR, CONV1D), LoraLinear),
]


def custom_modules(config: Any) -> dict[type, type]:
    """The config's own mapping from module type to LoRA layer class (empty if none)."""
    return dict(getattr(config, "_custom_modules", None) or {})


def check_mapping(mapping: Any) -> dict[type, type]:
    """`mapping` as `_register_custom_module` takes it, or a `TypeError` naming the bad entry."""
    if not isinstance(mapping, dict):
        raise TypeError(
            f"_register_custom_module takes a dict {{module type: LoRA layer class}}, got "
            f"{type(mapping).__name__}"
        )
    for key, value in mapping.items():
        if not (isinstance(key, type) and issubclass(key, nn.Module)):
            raise TypeError(
                f"_register_custom_module: key {key!r} is not an nn.Module subclass; map the "
                "type of the layers to adapt, e.g. {nn.LSTM: MyLoraLSTM}"
            )
        if not (isinstance(value, type) and issubclass(value, LoraLayer)):
            raise TypeError(
                f"_register_custom_module: {key.__name__} maps to {value!r}, which does not "
                "subclass lorakit's LoraLayer; write `class MyLora(nn.Module, LoraLayer)` "
                "(from lorakit.tuners.lora import LoraLayer)"
            )
        if not issubclass(value, nn.Module):
            raise TypeError(
                f"_register_custom_module: {value.__name__} is not an nn.Module; write "
                f"`class {value.__name__}(nn.Module, LoraLayer)`"
            )
    return mapping


def layer_class(
    module: nn.Module, config: Any = None, parent: nn.Module | None = None
) -> type | None:
    """The LoRA layer class that wraps `module` (its base layer if wrapped), or None; `parent`
    is the module holding it (for the rules that depend on it)."""
    base = module.base_layer if isinstance(module, LoraLayer) else module
    for key, layer_cls in custom_modules(config).items():
        if isinstance(base, key):
            return layer_cls
    for match, layer_cls in BUILTIN:
        hit = isinstance(base, match) if isinstance(match, type | tuple) else match(base, parent)
        if hit:
            return layer_cls
    return None


def parent_of(model: nn.Module, name: str) -> nn.Module:
    """The module of `model` that holds module `name`."""
    parent_name = name.rpartition(".")[0]
    return model.get_submodule(parent_name) if parent_name else model


def wrap(
    module: nn.Module, adapter_name: str, config: Any, name: str, parent: nn.Module | None = None
) -> nn.Module:
    """`module` wrapped in its LoRA layer class with adapter `adapter_name` (peft's call)."""
    layer_cls = layer_class(module, config, parent)
    if layer_cls is None:
        raise TypeError(f"LoRA cannot wrap {type(module).__name__} (`{name}`)")
    return layer_cls(
        module,
        adapter_name,
        config=config,
        r=config.rank_for(name),
        lora_alpha=config.alpha_for(name),
        target_name=name,
    )


def is_custom(module: nn.Module) -> bool:
    """A LoRA layer lorakit's own code does not describe (not a `LoraLinear`)."""
    return isinstance(module, LoraLayer) and not isinstance(module, LoraLinear)


def adapter_tensors(layer: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """A custom layer's tensors of one adapter, by their file key under the layer's path: the
    parameters under a `lora_*` attribute with the adapter name dropped from their name."""
    found = {}
    for key, tensor in layer.named_parameters():
        parts = key.split(".")
        if parts[0].startswith("lora_") and adapter_name in parts[1:]:
            found[".".join(p for p in parts if p != adapter_name)] = tensor
    return found
