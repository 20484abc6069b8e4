"""What llama.cpp expects of each architecture: its name, its hyper-parameters as GGUF metadata,
its tensor names and layouts.

One table (`ARCHITECTURES`) says, per Hugging Face `model_type`, which llama.cpp architecture
reads it and which of three layout changes its weights need on the way:

- `interleaved_rope`: llama.cpp's `llama` architecture rotates interleaved pairs (0,1), (2,3),
  ... of each head, Hugging Face rotates halves (i, i + head_dim/2); the rows of q_proj and
  k_proj (and of a LoRA B feeding them) are reordered within each head to match;
- `norm_plus_one`: Gemma's RMSNorm multiplies by (1 + weight), llama.cpp by weight, so 1 is
  added to every norm weight;
- tensor names: the `gguf` package's own map (`gguf.get_tensor_name_map`), the names llama.cpp
  reads; a tensor it does not know is refused by name rather than dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lorakit.errors import ModelError


@dataclass(frozen=True)
class Arch:
    """How one Hugging Face architecture is written for llama.cpp."""

    gguf_name: str  # llama.cpp's architecture (general.architecture)
    interleaved_rope: bool = False
    norm_plus_one: bool = False
    tied_output_only: bool = False  # llama.cpp has no separate output tensor for it


ARCHITECTURES: dict[str, Arch] = {
    "llama": Arch("llama", interleaved_rope=True),
    "mistral": Arch("llama", interleaved_rope=True),
    "qwen2": Arch("qwen2"),
    "qwen3": Arch("qwen3"),
    "gemma2": Arch("gemma2", norm_plus_one=True, tied_output_only=True),
    "gemma3_text": Arch("gemma3", norm_plus_one=True),
    "phi3": Arch("phi3"),
}


def arch_of(config: Any) -> Arch:
    """The `Arch` of a transformers config; a ModelError naming the model type otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ModelError(
            f"export to GGUF: architecture `{model_type}` "
            f"({', '.join(getattr(config, 'architectures', None) or []) or 'no class recorded'}) "
            f"is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


def head_dim(config: Any) -> int:
    """Width of one attention head."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_heads(config: Any) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _rope(config: Any, layer_type: str = "full_attention") -> dict:
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type in params:  # one set per layer type (Gemma 3)
        params = params[layer_type]
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return {**params, "rope_theta": theta}


def _gguf():
    import gguf

    return gguf


def write_hparams(writer: Any, config: Any) -> None:
    """Add the architecture's hyper-parameters to a `gguf.GGUFWriter`; refuse settings that
    llama.cpp would read differently (rope scaling kinds it is not told about, a query scale it
    does not use)."""
    arch = arch_of(config)
    rope = _rope(config)
    if rope.get("rope_type", "default") not in ("default", "linear"):
        raise ModelError(
            f"export to GGUF: rope_type `{rope['rope_type']}` of {config.model_type} is not "
            "supported by lorakit's export (supported: default, linear)"
        )
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(kv_heads(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_vocab_size(int(config.vocab_size))
    dim = head_dim(config)
    writer.add_key_length(dim)
    writer.add_value_length(dim)
    fraction = float(rope.get("partial_rotary_factor", 1.0) or 1.0)
    writer.add_rope_dimension_count(int(dim * fraction))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(_gguf().RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if arch.norm_plus_one:
        _gemma_hparams(writer, config)
    elif arch.gguf_name == "phi3" and getattr(config, "sliding_window", None):
        writer.add_sliding_window(int(config.sliding_window))


def _gemma_hparams(writer: Any, config: Any) -> None:
    scalar = getattr(config, "query_pre_attn_scalar", None)
    dim = head_dim(config)
    if scalar not in (None, dim, config.hidden_size // config.num_attention_heads):
        raise ModelError(
            f"export to GGUF: {config.model_type} with query_pre_attn_scalar={scalar}: llama.cpp "
            f"scales queries by 1/sqrt(head_dim={dim}) (or hidden/heads for the 27B model)"
        )
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(int(config.sliding_window))
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
    if config.model_type == "gemma2":
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping or 0.0))
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping or 0.0))
    else:
        local = _rope(config, "sliding_attention")["rope_theta"]
        writer.add_rope_freq_base_swa(float(local))


def gguf_tensor_name(config: Any, hf_name: str) -> str:
    """llama.cpp's name for a Hugging Face weight name (`model.layers.0.self_attn.q_proj.weight`
    -> `blk.0.attn_q.weight`); a ModelError naming the tensor when llama.cpp has none."""
    gguf = _gguf()
    arch = arch_of(config)
    key = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.gguf_name)
    names = gguf.get_tensor_name_map(key, int(config.num_hidden_layers))
    name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ModelError(
            f"export to GGUF: tensor `{hf_name}` of {config.model_type} has no llama.cpp name "
            f"for architecture `{arch.gguf_name}`; nothing was written"
        )
    return name


def interleave_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder the rows (dim 0) of each head from halves (x_0..x_{d/2-1}, y_0..y_{d/2-1}) to
    pairs (x_0, y_0, x_1, y_1, ...): Hugging Face's rotary layout to llama.cpp's `llama`."""
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def layout(config: Any, hf_name: str, weight: torch.Tensor) -> torch.Tensor:
    """A Hugging Face weight (or a LoRA B, whose rows are the layer's outputs) in llama.cpp's
    layout: q/k rows interleaved for `llama`, 1 added to Gemma's norm weights."""
    arch = arch_of(config)
    if arch.interleaved_rope and ".self_attn.q_proj." in hf_name:
        return interleave_rows(weight, config.num_attention_heads)
    if arch.interleaved_rope and ".self_attn.k_proj." in hf_name:
        return interleave_rows(weight, kv_heads(config))
    if arch.norm_plus_one and hf_name.endswith("norm.weight"):
        return weight + 1.0
    return weight


def model_tensors(config: Any, state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """(llama.cpp name, tensor in llama.cpp's layout) for every weight of a model's state dict;
    a tied `lm_head` is left out (llama.cpp reads the embedding instead)."""
    arch = arch_of(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out = []
    for hf_name, tensor in state.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        if hf_name.startswith("lm_head.") and tied:
            continue
        if hf_name.startswith("lm_head.") and arch.tied_output_only:
            raise ModelError(
                f"export to GGUF: {config.model_type} in llama.cpp always reads its output "
                "layer from the embedding, but this model has its own lm_head (an adapter on "
                "a tied lm_head unties it); export without that adapter, or train it without "
                "lm_head"
            )
        out.append((gguf_tensor_name(config, hf_name), layout(config, hf_name, tensor)))
    return out
