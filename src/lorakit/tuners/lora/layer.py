"""peft's `peft.tuners.lora.layer` path: `LoraLayer` (the base of every LoRA layer, not an
`nn.Module`), `Linear` and `Embedding` (lorakit's `LoraLinear` / `LoraEmbedding`, which take
peft's constructor call `Linear(base_layer, adapter_name, config=config, r=8, lora_alpha=16)`)."""

from lorakit.lora.layers import LoraEmbedding, LoraLayer, LoraLinear

Linear = LoraLinear
Embedding = LoraEmbedding

__all__ = ["Embedding", "Linear", "LoraLayer"]
