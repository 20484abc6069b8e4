"""Finding target modules, wrapping them (each in the class `registry` picks: `LoraLinear`,
`LoraEmbedding`, `LoraConv`, `LoraMHA` or a registered one), and choosing what trains.

Target rules: a list entry matches a module whose full name equals it, ends with `.` + it, or
whose class name equals it ("Linear", "Conv1D", "Embedding"); a string is a full regex match
on the name; "all-linear" is every linear layer except the output head; "preset" is the
architecture's preset from `lorakit.lora.presets.target_preset`.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.lora import registry, replication
from lorakit.lora.config import LoraConfig
from lorakit.lora.layers import (
    CONV1D,
    LINEAR,
    LoraLayer,
    LoraLinear,
    ModulesToSave,
    layer_kind,
)
from lorakit.lora.moe import all_linear_parameters
from lorakit.lora.params import LoraParams, check_param_config
from lorakit.lora.presets import parameter_preset, target_preset
from lorakit.lora.tokens import TrainableTokens, add_token_adapters, check_tokens

_LAYER_INDEX_PATTERNS = ("layers", "h", "block", "blocks", "layer")


# containers a modules_to_save copy cannot stand in for (they have no forward of their own)
_CONTAINERS = (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)
# layer kinds peft adapts and lorakit does not
_PEFT_LAYER_KINDS = ("ParamWrapper",)


def walk(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for every submodule, not descending into LoRA or modules_to_save wrappers."""
    for name, child in model.named_children():
        full = f"{prefix}.{name}" if prefix else name
        yield full, child
        if not isinstance(child, (LoraLayer, ModulesToSave, LoraParams, TrainableTokens)):
            yield from walk(child, full)


def _unwrap(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoraLayer) else module


def _suffix_match(name: str, wanted: str) -> bool:
    """Whether module path `name` is `wanted` or ends with `.wanted` (whole path components)."""
    return name == wanted or name.endswith("." + wanted)


def _name_matches(spec: list[str] | str | None, name: str, module: nn.Module) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    cls = type(_unwrap(module)).__name__
    return any(_suffix_match(name, e) or cls == e for e in spec)


def _output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head if isinstance(head, nn.Module) else None


def _layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    for pattern in patterns or _LAYER_INDEX_PATTERNS:
        found = re.match(rf"(?:.*\.)?{pattern}\.(\d+)(?:\.|$)", name)
        if found:
            return int(found.group(1))
    return None


def resolve_targets(model: nn.Module, config: LoraConfig) -> list[str] | str | None:
    """`config.target_modules` with 'preset' replaced by the architecture's module names."""
    targets = config.target_modules
    if targets == "preset" or targets == ["preset"]:
        preset = target_preset(model)
        if preset is None:
            raise ConfigError(_no_preset_message(model))
        return preset
    return targets


def expand_targets(model: nn.Module, config: LoraConfig) -> None:
    """Make `config` name what it adapts, in place: 'preset' becomes the architecture's module
    names, 'all-linear' the names of the linear layers it reaches (their last name parts where
    those pick exactly these layers) plus, on a mixture-of-experts model, the expert and router
    parameters (`moe.all_linear_parameters`), unless `target_parameters` is [] (an adapter file
    that said 'all-linear' before lorakit adapted experts: it holds linear layers only)."""
    preset = config.target_modules in ("preset", ["preset"])
    config.target_modules = resolve_targets(model, config)
    experts = all_linear_parameters(model)
    if preset and config.target_parameters is None:
        config.target_parameters = parameter_preset(model)
    if config.target_modules == "all-linear":
        found = [name for name, _ in find_targets(model, config)]
        leaves = sorted({name.rpartition(".")[2] for name in found})
        probe = copy.copy(config)
        probe.target_modules = leaves
        same = [name for name, _ in find_targets(model, probe)] == found
        config.target_modules = leaves if same else sorted(found)
        if config.target_parameters is None:
            config.target_parameters = experts or None
    if experts and isinstance(config.target_modules, list):
        config.target_modules = _unambiguous(model, config)


# names that peft (>= 0.19) reads, on a model with fused experts, as the per-expert layers of
# the older transformers 4 checkpoints and maps onto the expert parameters (doubling the rank
# of gate_up_proj for Mixtral / Qwen2-MoE): written as full paths they keep their meaning
_PEFT_REMAPPED = frozenset({"gate", "w1", "w2", "w3", "gate_proj", "up_proj", "down_proj"})


def _unambiguous(model: nn.Module, config: LoraConfig) -> list[str]:
    """`config.target_modules` with each name peft would remap replaced by the full names of
    the layers it matches here."""
    targets = config.target_modules
    risky = [t for t in targets if t.rpartition(".")[2] in _PEFT_REMAPPED and "." not in t]
    if not risky:
        return targets
    found = [name for name, _ in find_targets(model, config)]
    full = [name for name in found if any(_suffix_match(name, t) for t in risky)]
    return sorted(t for t in targets if t not in risky) + sorted(full)


def find_param_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, str]]:
    """(module name, parameter name) of every parameter `config.target_parameters` names, in
    module order and, per module, in the order the module registered them (peft's nesting
    order). A name matches the full `<module>.<parameter>` path or its end after a dot."""
    wanted = config.target_parameters or []
    found = []
    for name, module in walk(model):
        owner = module.base_layer if isinstance(module, (LoraLayer, LoraParams)) else module
        if isinstance(module, ModulesToSave):
            continue
        for param_name, _ in owner.named_parameters(recurse=False):
            key = f"{name}.{param_name}"
            if not any(key == w or key.endswith("." + w) for w in wanted):
                continue
            if isinstance(module, LoraLayer):
                raise ConfigError(
                    f"target_parameters matches `{key}`, a parameter of `{name}`, which "
                    "target_modules adapts already; adapt it one way only (as peft requires)"
                )
            found.append((name, param_name))
    if wanted and not found:
        params = sorted({f"{n}.{p}".rpartition(".")[2] for n, m in walk(model) for p, _ in _own(m)})
        raise ConfigError(
            f"target_parameters={wanted} matched no parameter of {type(model).__name__}; a name "
            "matches `<module path>.<parameter>` or its end after a dot, e.g. 'gate_up_proj' or "
            f"'mlp.gate.weight'; parameter names here: {params[:20]}"
        )
    return found


def _own(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    owner = module.base_layer if isinstance(module, (LoraLayer, LoraParams)) else module
    return list(owner.named_parameters(recurse=False))


def saved_targets(
    model: nn.Module, config: LoraConfig, adapter_name: str
) -> list[str] | str | None:
    """`target_modules` as written to adapter_config.json: peft matches module names only, so a
    list naming a class ("Linear") is written as the names of the layers the adapter wraps (their
    last name parts where those match exactly these layers, else their full names, else a regex)."""
    targets = config.target_modules
    modules = list(walk(model))
    if not isinstance(targets, list):
        return targets
    by_name = {t for t in targets if any(_ends_with(n, [t]) for n, _ in modules)}
    if len(by_name) == len(targets):
        return targets
    wrapped = [n for n, m in modules if isinstance(m, LoraLayer) and adapter_name in m.r]
    for names in ({n.split(".")[-1] for n in wrapped} | by_name, set(wrapped) | by_name):
        hits = [n for n, _ in modules if _ends_with(n, names) and _in_layers(n, config)]
        if hits == wrapped:
            return sorted(names)
    return "|".join(re.escape(n) for n in wrapped)


def _ends_with(name: str, targets: Iterable[str]) -> bool:
    return any(_suffix_match(name, t) for t in targets)


def _in_layers(name: str, config: LoraConfig) -> bool:
    if config.layers_to_transform is None:
        return True
    return _layer_index(name, config.layers_pattern) in config.layers_to_transform


def find_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs `config` adapts in `model`; raises a clear error on no match."""
    targets = resolve_targets(model, config)
    if targets is None and config.target_parameters:
        return []
    if targets is None:
        raise ConfigError(
            "LoraConfig.target_modules is not set: give a list of module names (e.g. "
            "['q_proj', 'v_proj']), a regex, 'all-linear', or 'preset'\n" + _layer_names_hint(model)
        )
    head = _output_head(model)
    found = []
    for name, module in walk(model):
        if targets == "all-linear":
            hit = layer_kind(module) in (LINEAR, CONV1D) and _unwrap(module) is not head
            hit = hit and name.split(".")[-1] != "lm_head"
        else:
            hit = _name_matches(targets, name, module)
        if not hit or _name_matches(config.exclude_modules, name, module):
            continue
        if _inside_modules_to_save(name, config.modules_to_save):
            continue  # as in peft: a module saved whole is not also LoRA-adapted
        if registry.layer_class(module, config, registry.parent_of(model, name)) is None:
            if isinstance(targets, list) and type(module).__name__ in targets:
                continue  # a class-name target matched a container of that name
            kind = type(module).__name__
            what = (
                f"a {kind}: LoRA on a {kind} is not supported by lorakit"
                if kind in _PEFT_LAYER_KINDS
                else f"a {kind}, which LoRA cannot wrap"
            )
            raise ConfigError(
                f"target `{name}` is {what}; target its linear, embedding, convolution or "
                "MultiheadAttention children instead, or register a LoRA layer class for it "
                "(config._register_custom_module, see lorakit.lora.registry)\n"
                + _layer_names_hint(model)
            )
        if config.layers_to_transform is not None:
            index = _layer_index(name, config.layers_pattern)
            if index is None or index not in config.layers_to_transform:
                continue
        found.append((name, module))
    if not found and not config.target_parameters:
        saved = (
            f" outside modules_to_save={config.modules_to_save}" if config.modules_to_save else ""
        )
        raise ConfigError(
            f"target_modules={targets!r} matched no layer of {type(model).__name__}{saved}\n"
            + _layer_names_hint(model)
        )
    return found


def _inside_modules_to_save(name: str, modules_to_save: list[str] | None) -> bool:
    """Whether module `name` is, or lies inside, a module `modules_to_save` names."""
    parts = name.split(".")
    prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
    return any(_suffix_match(p, w) for w in modules_to_save or [] for p in prefixes)


def _layer_names_hint(model: nn.Module) -> str:
    names = [n for n, m in walk(model) if layer_kind(m) is not None]
    suffixes = sorted({n.split(".")[-1] for n in names})
    hint = f"layers LoRA can wrap here ({len(names)}): e.g. {names[:6]}; names: {suffixes[:20]}"
    try:
        preset = target_preset(model)
    except ImportError:
        preset = None
    if preset:
        hint += f"\nthe preset for this architecture: target_modules={preset} (or 'preset')"
    return hint


def _no_preset_message(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    return f"no target preset for `{model_type}`: list target_modules\n" + _layer_names_hint(model)


def add_adapter_layers(model: nn.Module, config: LoraConfig, adapter_name: str) -> list[str]:
    """Wrap (or extend) every target of `config` with adapter `adapter_name`; returns the names.
    With `layer_replication`, the layers are replicated first (`replication.replicate`)."""
    if config.layer_replication:
        adapted = any(isinstance(m, (LoraLayer, LoraParams)) for m in model.modules())
        replication.replicate(model, config.layer_replication, adapted)
    expand_targets(model, config)
    check_tokens(model, config)
    names = []
    for name, module in find_targets(model, config):
        if isinstance(module, LoraLayer):  # peft's call for a layer that has adapters
            r, alpha = config.rank_for(name), config.alpha_for(name)
            module.update_layer(adapter_name, r, lora_alpha=alpha, config=config, target_name=name)
        else:
            parent = registry.parent_of(model, name)
            module = registry.wrap(module, adapter_name, config, name, parent)
            replace_module(model, name, module)
        if module.kind == CONV1D:
            config.fan_in_fan_out = True  # Conv1D stores its weight as (in, out)
        names.append(name)
    names += add_parameter_adapters(model, config, adapter_name)
    for name, module in find_modules_to_save(model, config):
        if isinstance(module, _CONTAINERS):
            raise TypeError(
                f"modules_to_save cannot be applied to modules of type {type(module).__name__} "
                f"(`{name}`): a container's forward is its owner's code; name the layers inside "
                "it instead (e.g. modules_to_save=['" + name + ".0'])"
            )
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            replace_module(model, name, module)
        module.add_copy(adapter_name)
    add_token_adapters(model, config, adapter_name)
    return names


def add_parameter_adapters(model: nn.Module, config: LoraConfig, adapter_name: str) -> list[str]:
    """Wrap the owners of `config.target_parameters` in `LoraParams` (or extend them) with
    adapter `adapter_name`; returns the wrapped module names."""
    targets = find_param_targets(model, config)
    for name, param in targets:
        check_param_config(config, f"{name}.{param}")
    names = []
    for name, param in targets:
        module = model.get_submodule(name)
        if not isinstance(module, LoraParams):
            module = LoraParams(module)
            replace_module(model, name, module)
        key = f"{name}.{param}"
        module.add(
            adapter_name,
            param,
            r=config.rank_for(key),
            alpha=config.alpha_for(key),
            use_rslora=config.use_rslora,
            init=config.init_lora_weights,
        )
        names.append(name)
    return list(dict.fromkeys(names))


def find_modules_to_save(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs named by `config.modules_to_save`."""
    wanted = config.modules_to_save or []
    found = [(n, m) for n, m in walk(model) if any(_suffix_match(n, w) for w in wanted)]
    missing = [w for w in wanted if not any(_suffix_match(n, w) for n, _ in found)]
    if missing:
        raise ConfigError(f"modules_to_save {missing} match no module\n" + _layer_names_hint(model))
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` in place of the submodule called `name`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def mark_trainable(model: nn.Module, adapter_names: list[str], bias: str = "none") -> None:
    """Freeze everything, then unfreeze the named adapters, their module copies and biases."""
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if registry.is_custom(module):
            for adapter in adapter_names:
                for param in registry.adapter_tensors(module, adapter).values():
                    param.requires_grad_(True)
        elif isinstance(module, LoraLinear):
            for adapter in adapter_names:
                if adapter in module.r:
                    for param in module.adapter_parameters(adapter):
                        param.requires_grad_(True)
            if bias == "lora_only" and getattr(module.base_layer, "bias", None) is not None:
                module.base_layer.bias.requires_grad_(True)
        elif isinstance(module, LoraParams):
            for adapter in adapter_names:
                if adapter in module.r:
                    for param in module.adapter_parameters(adapter):
                        param.requires_grad_(True)
        elif isinstance(module, TrainableTokens):
            for adapter in adapter_names:
                for param in module.adapter_parameters(adapter):
                    param.requires_grad_(True)
        elif isinstance(module, ModulesToSave):
            for adapter in adapter_names:
                if adapter in module.modules_to_save:
                    module.modules_to_save[adapter].requires_grad_(True)
    if bias == "all":
        for name, param in model.named_parameters():
            if is_shared_bias(name):
                param.requires_grad_(True)


def is_shared_bias(name: str) -> bool:
    """A base-model bias that `bias="all"` trains (not one inside a module copy)."""
    return name.endswith("bias") and not any(
        part in name for part in (".original_module.", ".modules_to_save.", "lora_")
    )


# ----------------------------------------------------------------- the functional form


def inject_lora(
    model: nn.Module,
    target_modules: list[str] | str,
    rank: int = 16,
    lora_alpha: float = 32,
    lora_dropout: float = 0.0,
    adapter_name: str = "default",
    **config_fields,
) -> nn.Module:
    """Wrap `target_modules` of `model` in place with a fresh adapter and freeze the rest."""
    config = LoraConfig(
        r=rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules,
        **config_fields,
    )
    add_adapter_layers(model, config, adapter_name)
    mark_trainable(model, [adapter_name], config.bias)
    return model


def lora_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors of `model` (all adapters, or one), with the model's own key names."""
    keys = (
        "lora_A.",
        "lora_B.",
        "lora_embedding_A.",
        "lora_embedding_B.",
        "lora_magnitude_vector.",
    )
    out = {}
    for name, tensor in model.state_dict().items():
        if any(k in name for k in keys) and (
            adapter_name is None or f".{adapter_name}." in name + "."
        ):
            out[name] = tensor
    return out


@dataclass
class InjectionReport:
    """What `check_injection` found: LoRA layers, frozen and trainable parameters."""

    lora_layers: list[str] = field(default_factory=list)
    trainable_lora: int = 0
    frozen: int = 0
    trainable_base: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"LoRA layers: {len(self.lora_layers)} ({', '.join(self.lora_layers[:4])}"
            + (", ..." if len(self.lora_layers) > 4 else "")
            + ")",
            f"trainable LoRA params: {self.trainable_lora:,}",
            f"frozen params: {self.frozen:,}",
        ]
        if self.trainable_base:
            lines.append(f"WARNING trainable non-LoRA params: {self.trainable_base}")
        return "\n".join(lines)


def check_injection(model: nn.Module) -> InjectionReport:
    """List LoRA layers, count frozen and trainable params, flag trainable base params."""
    report = InjectionReport()
    report.lora_layers = [
        n for n, m in model.named_modules() if isinstance(m, (LoraLayer, LoraParams))
    ]
    for name, param in model.named_parameters():
        if not param.requires_grad:
            report.frozen += param.numel()
        elif "lora_" in name:
            report.trainable_lora += param.numel()
        else:
            report.trainable_base.append(name)
    return report


def check_gradients(model: nn.Module) -> list[str]:
    """Names of trainable parameters whose gradient is missing or all zero after backward."""
    return [
        name
        for name, param in model.named_parameters()
        if param.requires_grad and (param.grad is None or not param.grad.any())
    ]
