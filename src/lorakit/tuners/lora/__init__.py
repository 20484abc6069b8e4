"""peft's `peft.tuners.lora` names, for programs written against peft: the base class of a LoRA
layer of one's own (`LoraLayer`, used as `class MyLora(nn.Module, LoraLayer)`), lorakit's
linear and embedding layers under peft's names (`Linear`, `Embedding`), the config and the model.
The protocol a layer class follows is in `lorakit.lora.registry`; the layers are
`lorakit.lora.layers`."""

from lorakit.lora.config import LoraConfig
from lorakit.lora.model import LoraModel
from lorakit.tuners.lora.layer import Embedding, Linear, LoraLayer

__all__ = ["Embedding", "Linear", "LoraConfig", "LoraLayer", "LoraModel"]
