"""Tiny random mixture-of-experts models from transformers' config classes (fused 3-D experts),
for the training, quantization, estimate and serving tests. No tests live here."""

from __future__ import annotations

import torch

FAMILIES = {  # family -> (config class name, its expert settings)
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "intermediate_size": 64}),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {"num_experts": 4, "moe_intermediate_size": 64, "intermediate_size": 64},
    ),
    "olmoe": ("OlmoeConfig", {"num_experts": 4, "intermediate_size": 64}),
}


def moe_config(family: str = "qwen3_moe", vocab_size: int = 128, hidden: int = 64, **overrides):
    """The config of a 2-layer, 4-expert (2 per token) model of `family`; the router
    load-balancing loss is on (`output_router_logits`) with a visible weight."""
    import transformers

    name, experts = FAMILIES[family]
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        output_router_logits=True,
        router_aux_loss_coef=0.1,
        **experts,
    )
    return getattr(transformers, name)(**{**settings, **overrides})


def make_tiny_moe(family: str = "qwen3_moe", vocab_size: int = 128, **overrides):
    """A causal LM of `moe_config(family, ...)` with seeded random weights, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(moe_config(family, vocab_size, **overrides)).eval()


def expert_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The fused 3-D expert parameters (name -> parameter) of a transformers MoE model."""
    return {name: p for name, p in model.named_parameters() if p.dim() == 3}


def save_tiny_moe(path, family: str = "qwen3_moe"):
    """A tiny random MoE of `family` with the built-in model's tokenizer (vocab 49152, ChatML)
    saved to `path` as a Hugging Face folder; returns `path`."""
    from builtin_model import builtin_tokenizer

    tokenizer = builtin_tokenizer()
    model = make_tiny_moe(family, vocab_size=len(tokenizer), hidden=32)
    eos = tokenizer.eos_token_id
    model.config.eos_token_id = model.config.pad_token_id = eos
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = eos
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
