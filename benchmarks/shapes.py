"""Model shapes the benchmarks share: SmolLM2-135M's architecture with random weights."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def smollm2_shape(layers: int = 30, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """SmolLM2-135M's architecture (hidden 576, 9 heads / 3 KV heads, MLP 1536), random weights."""
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype).eval()
