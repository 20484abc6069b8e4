"""Runs peft's own LoRA tests against lorakit: peft's public LoRA names are swapped for lorakit's
before the test modules import them. Test bodies are peft's, unedited (see run.sh)."""

import peft

import lorakit

for _name in ("LoraConfig", "PeftConfig", "PeftModel", "PeftModelForCausalLM",
              "PeftModelForSequenceClassification", "PeftModelForTokenClassification",
              "PeftModelForQuestionAnswering", "PeftModelForFeatureExtraction", "get_peft_model",
              "get_peft_model_state_dict", "set_peft_model_state_dict", "TaskType",
              "prepare_model_for_kbit_training"):  # fmt: skip
    setattr(peft, _name, getattr(lorakit, _name))
