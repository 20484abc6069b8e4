"""peft's and Hugging Face's face of lorakit: what peft programs, `Trainer`, TRL and accelerate
expect of a model, kept apart so that the core (`lora/layers.py`, `inject.py`, `model.py`, ...)
reads without it. The core's layers and injection never import this package
(`tests/test_layout.py`).

- `hf_face`: `HFFace`, the `PreTrainedModel` in type only that `LoraModel` inherits.
- `tuner`: `LoraTuner`, `lora_model.base_model` (peft's tuner level between wrapper and model).
- `reading`: reading an adapter folder for `from_pretrained` / `load_adapter`.
- `peft_names`: peft's state-dict helpers `get_peft_model_state_dict` / `set_...`.
- `auto`: `AutoPeftModelForCausalLM`.
- `loraplus`: the LoRA+ parameter groups (lorakit's `train.lora_b_lr` uses them too) and
  peft's `create_loraplus_optimizer`.
- `fields`: peft's tables for `LoraConfig`: refused and kept fields, `TaskType`, `PeftType`.
- `keywords`: `check_peft_kwargs`, the one check of peft's keywords lorakit does not use.
- `reference`: `reference_model(lora_model)`, the base as a reference model for TRL's
  `DPOTrainer(ref_model=...)`, sharing every weight (each call runs with the adapter off).
- `surface`: `PeftSurface`, the part of `LoraModel` only peft programs and `Trainer` use, and
  `inject_adapter_in_model`.

Import the modules themselves (`lorakit.lora.compat.surface`); this file imports only the
light `check_peft_kwargs`, since `lora/config.py` reads `fields` while the package loads.
"""

from lorakit.lora.compat.keywords import check_peft_kwargs

__all__ = ["check_peft_kwargs"]
