"""Per-architecture LoRA targets: the module names `target_modules="preset"` resolves to."""

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


def target_preset(model_or_config: Any) -> list[str] | None:
    """The default LoRA target module names for a model's architecture, or None if unknown."""
    if isinstance(model_or_config, str):
        model_type = model_or_config
    else:
        config = getattr(model_or_config, "config", model_or_config)
        if isinstance(config, dict):
            model_type = config.get("model_type")
        else:
            model_type = getattr(config, "model_type", None)
    preset = TARGET_PRESETS.get(model_type or "")
    return list(preset) if preset else None
