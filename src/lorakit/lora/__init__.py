"""The LoRA core: config, layers, injection, the model wrapper and the adapter file format.

`get_peft_model(model, LoraConfig(...))` wraps any `nn.Module`; `LoraModel.from_pretrained`
loads a saved adapter (peft's format) onto a base model.
"""

from lorakit.lora.adapters import check_adapter, read_adapter
from lorakit.lora.compat.auto import AutoPeftModelForCausalLM
from lorakit.lora.compat.fields import PeftType, TaskType
from lorakit.lora.compat.peft_names import get_peft_model_state_dict, set_peft_model_state_dict
from lorakit.lora.compat.surface import inject_adapter_in_model
from lorakit.lora.config import LoraConfig
from lorakit.lora.inject import (
    check_gradients,
    check_injection,
    inject_lora,
    lora_state_dict,
)
from lorakit.lora.layers import LoraLinear, ModulesToSave
from lorakit.lora.model import LoraModel, get_peft_model
from lorakit.lora.presets import TARGET_PRESETS, target_preset
from lorakit.lora.rows import BASE, PackedAdapters

__all__ = [
    "BASE",
    "AutoPeftModelForCausalLM",
    "PeftType",
    "TARGET_PRESETS",
    "LoraConfig",
    "LoraLinear",
    "LoraModel",
    "ModulesToSave",
    "PackedAdapters",
    "TaskType",
    "check_adapter",
    "check_gradients",
    "check_injection",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "inject_lora",
    "lora_state_dict",
    "read_adapter",
    "set_peft_model_state_dict",
    "target_preset",
]
