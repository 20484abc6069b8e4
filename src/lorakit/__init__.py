"""lorakit: LoRA and QLoRA fine-tuning with a peft-compatible API and file format."""

from lorakit.errors import AdapterError, ConfigError, DataError, LorakitError, ModelError
from lorakit.lora import (
    LoraConfig,
    LoraLinear,
    LoraModel,
    TaskType,
    check_gradients,
    check_injection,
    get_peft_model,
    get_peft_model_state_dict,
    inject_lora,
    lora_state_dict,
    set_peft_model_state_dict,
)
from lorakit.quant import prepare_model_for_kbit_training
from lorakit.version import __version__

# peft's names for the same things: lorakit has one config class and one model class for every
# task type (peft's PeftModelForCausalLM etc. differ only in their forward's signature).
PeftConfig = LoraConfig
PeftModel = LoraModel
PeftModelForCausalLM = PeftModelForSequenceClassification = PeftModelForTokenClassification = (
    LoraModel
)
PeftModelForQuestionAnswering = PeftModelForFeatureExtraction = LoraModel

__all__ = [
    "AdapterError",
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
    "TaskType",
    "check_gradients",
    "check_injection",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_lora",
    "lora_state_dict",
    "prepare_model_for_kbit_training",
    "set_peft_model_state_dict",
    "__version__",
]
