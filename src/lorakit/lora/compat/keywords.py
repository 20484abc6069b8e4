"""peft's keywords that lorakit's functions take in `**peft_kwargs`, checked in one place.

peft's signatures carry keywords lorakit needs nothing for (inert: accepted, changing nothing)
and keywords for features lorakit does not have (refused when set). lorakit's own signatures
name only what they use and hand the rest to `check_peft_kwargs`:

- inert: `low_cpu_mem_usage` (an adapter's tensors are small and made directly on the base
  layer's device), `torch_device` and the other placement keywords (an adapter's tensors go
  where each base layer is), `revision` and the other hub keywords (only local folders are read);
- refused when set: `mixed`, `ephemeral_gpu_offload`, `key_mapping`, `state_dict`;
- anything else: a `TypeError`, as Python gives for an unknown keyword.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lorakit.errors import ConfigError

PLACEMENT = frozenset(
    {
        "torch_device",
        "device_map",
        "max_memory",
        "offload_folder",
        "offload_dir",
        "use_safetensors",
        "local_files_only",
    }
)
HUB = frozenset({"revision", "cache_dir", "token", "force_download", "proxies", "use_auth_token"})
_LOADING = PLACEMENT | HUB | {"low_cpu_mem_usage", "ephemeral_gpu_offload", "key_mapping"}

# the peft keywords each function takes
TAKES: dict[str, frozenset[str]] = {
    "get_peft_model": frozenset({"mixed", "revision", "low_cpu_mem_usage"}),
    "add_adapter": frozenset({"low_cpu_mem_usage"}),
    "from_pretrained": _LOADING,
    "load_adapter": _LOADING,
    "inject_adapter_in_model": frozenset({"low_cpu_mem_usage", "state_dict"}),
    "set_peft_model_state_dict": frozenset({"low_cpu_mem_usage", "ignore_mismatched_sizes"}),
}

# keyword -> (is it set?, the error when it is)
_REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "mixed": (
        bool,
        "get_peft_model(mixed=True) (peft's PeftMixedModel) is not supported by lorakit; several "
        "LoRA adapters live in one LoraModel: add_adapter() and set_adapter([...])",
    ),
    "ephemeral_gpu_offload": (
        bool,
        "ephemeral_gpu_offload=True is not supported by lorakit; leave it False",
    ),
    "key_mapping": (
        bool,
        "key_mapping is not supported by lorakit; adapter keys are read as peft writes them",
    ),
    "state_dict": (
        lambda value: value is not None,
        "inject_adapter_in_model(state_dict=...) is not supported by lorakit; give "
        "target_modules in the config",
    ),
}


def check_peft_kwargs(function: str, peft_kwargs: dict[str, Any]) -> None:
    """Refuse keywords `function` does not take (`TypeError`) and set refused ones
    (`ConfigError`); the inert rest pass."""
    unknown = sorted(set(peft_kwargs) - TAKES[function])
    if unknown:
        raise TypeError(f"{function}() got an unexpected keyword argument {unknown[0]!r}")
    for name, value in peft_kwargs.items():
        if name in _REFUSED and _REFUSED[name][0](value):
            raise ConfigError(_REFUSED[name][1])


def adapter_call(args: tuple, kwargs: dict[str, Any], active: Any) -> tuple[str, Any]:
    """(adapter name, config) of an `add_adapter` call, in any of its shapes: peft's
    `(name, peft_config)` by position or keyword (`config=` too), transformers'
    `(peft_config, adapter_name=...)` with 'default' for no name, and a name only (peft's
    quicktour), which takes `active`, the active adapter's config. Pops what it reads."""
    if len(args) > 2:
        raise TypeError(f"add_adapter() takes at most 2 positional arguments ({len(args)} given)")
    name = kwargs.pop("adapter_name", None)
    config = kwargs.pop("peft_config", None) or kwargs.pop("config", None)
    for arg in args:
        if isinstance(arg, str):
            if name is not None:
                raise TypeError("add_adapter() got multiple values for argument 'adapter_name'")
            name = arg
        else:
            if config is not None:
                raise TypeError("add_adapter() got multiple values for argument 'peft_config'")
            config = arg
    if config is not None and name is None:
        name = "default"  # transformers' default adapter name
    if config is None:
        config = active
    if name is None or config is None:
        raise TypeError(
            "add_adapter() needs an adapter name and a config: add_adapter('name', LoraConfig(...))"
        )
    return name, config
