"""lorakit: LoRA and QLoRA fine-tuning with a peft-compatible API and file format.

The names below load on first use (PEP 562), so `import lorakit` and the `lorakit` command
start without importing torch until something needs it.
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

_FROM_LORA = {
    "LoraConfig", "LoraLinear", "LoraModel", "check_gradients", "check_injection",
    "get_peft_model", "inject_lora", "lora_state_dict",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    """The LoRA API, imported when first asked for; `PeftModel` reads like peft's
    `PeftModel.from_pretrained` and is `LoraModel`."""
    if name in _FROM_LORA or name == "PeftModel":
        lora = importlib.import_module("lorakit.lora")
        value = getattr(lora, "LoraModel" if name == "PeftModel" else name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")


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
