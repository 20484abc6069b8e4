"""lorakit: LoRA and QLoRA fine-tuning with a peft-compatible API and file format."""

from lorakit.errors import AdapterError, ConfigError, DataError, LorakitError, ModelError
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
from lorakit.version import __version__

PeftModel = (
    LoraModel  # `from lorakit import PeftModel` reads like peft's `PeftModel.from_pretrained`
)

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
