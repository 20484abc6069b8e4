"""peft's and Hugging Face's face of lorakit: what peft programs, `Trainer`, TRL and accelerate
expect of a model, kept apart so that the core (`lora/layers.py`, `inject.py`, `model.py`, ...)
reads without it. The core's layers and injection never import this package
(`tests/test_layout.py`).

- `hf_face`: `HFFace`, the `PreTrainedModel` in type only that `LoraModel` inherits.
- `tuner`: `LoraTuner`, `lora_model.base_model` (peft's tuner level between wrapper and model).
- `reading`: reading an adapter folder for `from_pretrained` / `load_adapter`.
- `peft_names`: peft's remaining public names: `TaskType`, the state-dict helpers.
- `auto`: `AutoPeftModelForCausalLM`.
- `loraplus`: peft's `create_loraplus_optimizer`.
"""
