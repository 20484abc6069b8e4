"""Tiny random mixture-of-experts and dense models built from transformers' config classes
(2 layers, hidden 16, 4 experts), shared by the MoE tests."""

from __future__ import annotations

import torch
import transformers

_ATTN = {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8}
_SMALL = {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 2, **_ATTN}
_EXPERTS = {"num_experts_per_tok": 2, "moe_intermediate_size": 12, "intermediate_size": 24}

MOE_CONFIGS = {
    "mixtral": ("MixtralConfig", {**_SMALL, "num_local_experts": 4, "intermediate_size": 12}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {**_SMALL, **_EXPERTS, "num_experts": 4, "shared_expert_intermediate_size": 8},
    ),
    "qwen3_moe": ("Qwen3MoeConfig", {**_SMALL, **_EXPERTS, "num_experts": 4}),
    "olmoe": (
        "OlmoeConfig",
        {**_SMALL, "num_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 12},
    ),
    "granitemoe": (
        "GraniteMoeConfig",
        {**_SMALL, "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 12},
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        {
            **_SMALL,
            **_EXPERTS,
            "num_key_value_heads": 2,
            "n_routed_experts": 4,
            "n_shared_experts": 1,
            "n_group": 1,
            "topk_group": 1,
            "first_k_dense_replace": 1,
            "q_lora_rank": 8,
            "kv_lora_rank": 8,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 8,
        },
    ),
    "gpt_oss": (
        "GptOssConfig",
        {**_SMALL, "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 12},
    ),
    "qwen3_next": (
        "Qwen3NextConfig",
        {
            **_SMALL,
            **_EXPERTS,
            "num_experts": 4,
            "shared_expert_intermediate_size": 8,
            "layer_types": ["linear_attention", "full_attention"],
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 2,
            "linear_key_head_dim": 8,
            "linear_value_head_dim": 8,
        },
    ),
}


def tiny_model(family: str, configs: dict = MOE_CONFIGS, seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM of `family`, in eval mode, fp32, eager attention."""
    class_name, fields = configs[family]
    config = getattr(transformers, class_name)(**fields)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2 and param.abs().sum() == 0:
                param.normal_(0, 0.1)  # routers start at zero in some families
    return model.eval()


_DENSE = {**_SMALL, "intermediate_size": 24, "pad_token_id": 0}
_NO_HEAD_DIM = {k: v for k, v in _DENSE.items() if k != "head_dim"}
DENSE_CONFIGS = {
    **{
        name: (cls, _DENSE)
        for name, cls in {
            "llama": "LlamaConfig",
            "mistral": "MistralConfig",
            "qwen2": "Qwen2Config",
            "qwen3": "Qwen3Config",
            "gemma": "GemmaConfig",
            "gemma2": "Gemma2Config",
            "gemma3": "Gemma3TextConfig",
            "phi3": "Phi3Config",
            "olmo2": "Olmo2Config",
            "starcoder2": "Starcoder2Config",
            "granite": "GraniteConfig",
            "smollm3": "SmolLM3Config",
            "glm4": "Glm4Config",
            "cohere2": "Cohere2Config",
            "exaone4": "Exaone4Config",
            "ernie4_5": "Ernie4_5Config",
            "seed_oss": "SeedOssConfig",
        }.items()
    },
    "phi": ("PhiConfig", _NO_HEAD_DIM),
    "gpt2": ("GPT2Config", {"vocab_size": 64, "n_embd": 16, "n_layer": 2, "n_head": 2}),
    "gpt_neox": ("GPTNeoXConfig", {**_DENSE, "num_key_value_heads": 2}),
    "falcon": ("FalconConfig", {**_NO_HEAD_DIM, "num_kv_heads": 1}),
    "lfm2": ("Lfm2Config", {**_DENSE, "layer_types": ["conv", "full_attention"]}),
}
