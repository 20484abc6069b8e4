"""peft's `peft.optimizers` path: `from lorakit.optimizers import create_loraplus_optimizer`
(LoRA+, `lorakit.lora.compat.loraplus`)."""

from lorakit.lora.compat.loraplus import create_loraplus_optimizer

__all__ = ["create_loraplus_optimizer"]
