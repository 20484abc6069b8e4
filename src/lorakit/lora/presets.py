"""Per-architecture LoRA targets: the module names `target_modules="preset"` resolves to, and
on mixture-of-experts families also the parameters (`parameter_preset`).

The MoE presets adapt the attention, every expert (the fused `gate_up_proj` / `down_proj`
stacks) and the shared experts, and leave the router alone: a router adapter moves the load
balance the base was trained with, for little gain. `all-linear` adapts the routers too.
"""

from __future__ import annotations

from typing import Any

_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_FUSED_QKV = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
TARGET_PRESETS: dict[str, list[str]] = {
    **{
        t: _PROJECTIONS
        for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2")
    },
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": _FUSED_QKV,
    "bloom": _FUSED_QKV,
    "falcon": _FUSED_QKV,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}
_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
_SHARED = ["gate_proj", "up_proj", "down_proj"]  # a shared expert's (or dense layer's) MLP
_MLA = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]  # DeepSeek
_LINEAR_ATTENTION = ["in_proj_qkvz", "in_proj_ba", "out_proj"]  # Qwen3-Next's gated DeltaNet
TARGET_PRESETS.update(
    {
        **{t: _ATTENTION for t in ("mixtral", "qwen3_moe", "olmoe", "granitemoe", "gpt_oss")},
        "qwen2_moe": _ATTENTION + _SHARED,
        "qwen3_next": _ATTENTION + _LINEAR_ATTENTION + _SHARED,
        "deepseek_v3": _MLA + _SHARED,
    }
)
_EXPERTS = ["gate_up_proj", "down_proj"]
PARAMETER_PRESETS: dict[str, list[str]] = {
    t: _EXPERTS
    for t in (
        "mixtral",
        "qwen2_moe",
        "qwen3_moe",
        "qwen3_next",
        "olmoe",
        "granitemoe",
        "gpt_oss",
        "deepseek_v3",
    )
}


def target_preset(model_or_config: Any) -> list[str] | None:
    """The default LoRA target module names for a model's architecture, or None if unknown."""
    preset = TARGET_PRESETS.get(_model_type(model_or_config) or "")
    return list(preset) if preset else None


def parameter_preset(model_or_config: Any) -> list[str] | None:
    """The default `target_parameters` (fused experts) of an MoE architecture, or None."""
    preset = PARAMETER_PRESETS.get(_model_type(model_or_config) or "")
    return list(preset) if preset else None


def _model_type(model_or_config: Any) -> str | None:
    if isinstance(model_or_config, str):
        model_type = model_or_config
    else:
        config = getattr(model_or_config, "config", model_or_config)
        if isinstance(config, dict):
            model_type = config.get("model_type")
        else:
            model_type = getattr(config, "model_type", None)
    return model_type
