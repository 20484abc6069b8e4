"""peft's `peft.tuners` import paths for programs that subclass LoRA layers: `from
lorakit.tuners import lora` then `lora.LoraLayer`, `lora.Linear` (see `lorakit.tuners.lora`)."""

from lorakit.tuners import lora

__all__ = ["lora"]
