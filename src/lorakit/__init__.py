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
        AutoPeftModelForCausalLM,
        LoraConfig,
        LoraLinear,
        LoraModel,
        PeftType,
        TaskType,
        check_gradients,
        check_injection,
        get_peft_model,
        get_peft_model_state_dict,
        inject_adapter_in_model,
        inject_lora,
        lora_state_dict,
        set_peft_model_state_dict,
    )
    from lorakit.lora.compat.reference import reference_model
    from lorakit.quant import prepare_model_for_kbit_training
    from lorakit.train import create_loraplus_optimizer
    from lorakit.train.optim8bit import AdamW8bit

    PeftConfig = LoraConfig
    PeftModel = PeftModelForCausalLM = PeftModelForSequenceClassification = LoraModel
    PeftModelForTokenClassification = PeftModelForQuestionAnswering = LoraModel
    PeftModelForFeatureExtraction = LoraModel

# public name -> (module, attribute). peft's names for the same things: lorakit has one config
# class and one model class for every task type (peft's PeftModelForCausalLM etc. differ only in
# their forward's signature).
_LAZY = {
    **{
        name: ("lorakit.lora", name)
        for name in (
            "AutoPeftModelForCausalLM",
            "LoraConfig",
            "LoraLinear",
            "LoraModel",
            "PeftType",
            "TaskType",
            "check_gradients",
            "check_injection",
            "get_peft_model",
            "get_peft_model_state_dict",
            "inject_adapter_in_model",
            "inject_lora",
            "lora_state_dict",
            "set_peft_model_state_dict",
        )
    },
    "PeftConfig": ("lorakit.lora", "LoraConfig"),
    **{
        name: ("lorakit.lora", "LoraModel")
        for name in (
            "PeftModel",
            "PeftModelForCausalLM",
            "PeftModelForSequenceClassification",
            "PeftModelForTokenClassification",
            "PeftModelForQuestionAnswering",
            "PeftModelForFeatureExtraction",
        )
    },
    "prepare_model_for_kbit_training": ("lorakit.quant", "prepare_model_for_kbit_training"),
    "create_loraplus_optimizer": ("lorakit.train", "create_loraplus_optimizer"),
    "AdamW8bit": ("lorakit.train.optim8bit", "AdamW8bit"),
    "reference_model": ("lorakit.lora.compat.reference", "reference_model"),
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
    "AdamW8bit",
    "AdapterError",
    "AutoPeftModelForCausalLM",
    "ConfigError",
    "DataError",
    "LoraConfig",
    "LoraLinear",
    "LoraModel",
    "LorakitError",
    "ModelError",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "TaskType",
    "check_gradients",
    "check_injection",
    "create_loraplus_optimizer",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "inject_lora",
    "lora_state_dict",
    "prepare_model_for_kbit_training",
    "reference_model",
    "set_peft_model_state_dict",
    "__version__",
]
