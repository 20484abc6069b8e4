"""lorakit: LoRA and QLoRA fine-tuning with a peft-compatible API and file format.

The names below are imported on first use (a module-level `__getattr__`), so that
`import lorakit` and the command line's start-up do not load torch until something needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lorakit.errors import AdapterError, ConfigError, DataError, LorakitError, ModelError
from lorakit.version import __version__

if TYPE_CHECKING:
    from lorakit.lora import (
        LoraConfig,
        LoraLinear,
        LoraModel,
        check_gradients,
        check_injection,
        get_peft_model,
        inject_lora,
        lora_state_dict,
    )

    PeftModel = LoraModel

# public name -> (module, attribute); `PeftModel` reads like peft's `PeftModel.from_pretrained`
_LAZY = {
    "LoraConfig": ("lorakit.lora", "LoraConfig"),
    "LoraLinear": ("lorakit.lora", "LoraLinear"),
    "LoraModel": ("lorakit.lora", "LoraModel"),
    "PeftModel": ("lorakit.lora", "LoraModel"),
    "check_gradients": ("lorakit.lora", "check_gradients"),
    "check_injection": ("lorakit.lora", "check_injection"),
    "get_peft_model": ("lorakit.lora", "get_peft_model"),
    "inject_lora": ("lorakit.lora", "inject_lora"),
    "lora_state_dict": ("lorakit.lora", "lora_state_dict"),
}


def __getattr__(name: str) -> Any:
    """Import a public name on first access and keep it in the module."""
    if name not in _LAZY:
        raise AttributeError(f"module 'lorakit' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AdapterError",
    "ConfigError",
    "DataError",
    "LoraConfig",
    "LoraLinear",
    "LoraModel",
    "LorakitError",
    "ModelError",
    "PeftModel",
    "check_gradients",
    "check_injection",
    "get_peft_model",
    "inject_lora",
    "lora_state_dict",
    "__version__",
]
