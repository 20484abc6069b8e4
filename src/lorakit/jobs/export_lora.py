"""An adapter as a GGUF LoRA file (what llama.cpp's `--lora` and Ollama's `ADAPTER` read), with
every module's scale folded in.

llama.cpp scales a LoRA file's update by `alpha / r` from one `adapter.lora.alpha` for the whole
file, or by 1 when that alpha is 0. lorakit writes alpha 0 and multiplies each module's B by
its own scale, as lorakit computes it (`lora_alpha / r`, `/ sqrt(r)` with rsLoRA,
`alpha_pattern` and `rank_pattern` resolved per module), so the update llama.cpp applies is
`(scale B) A`, exactly the one lorakit adds. B's rows are then put in llama.cpp's layout (the
q/k row order of the `llama` architecture). What a LoRA file cannot hold is refused with the
reason: DoRA (its magnitude is not a low-rank update), biases, `modules_to_save`, adapters on
the embedding, and an adapter on an output layer that llama.cpp reads from the embedding.
"""

from __future__ import annotations

from typing import Any

import torch

from lorakit.errors import AdapterError
from lorakit.lora.layers import LoraEmbedding
from lorakit.lora.model import LoraModel
from lorakit.models.gguf_arch import gguf_tensor_name, layout

_MERGE_INSTEAD = "export it merged instead (lorakit export BASE OUT.gguf --adapter DIR)"


def refusals(lora: LoraModel, adapter: str = "default") -> list[str]:
    """Why this adapter cannot be a GGUF LoRA file (empty when it can)."""
    config = lora.peft_config[adapter]
    reasons = []
    if config.use_dora:
        reasons.append(
            "it is a DoRA adapter (use_dora): its per-column magnitude rescales the whole "
            "weight, which a LoRA file (A and B only) cannot express"
        )
    if config.bias != "none":
        reasons.append(f"bias={config.bias!r}: llama.cpp's LoRA files hold no biases")
    if config.lora_bias:
        reasons.append("lora_bias=True: llama.cpp's LoRA files hold A and B only, no bias")
    if config.modules_to_save:
        reasons.append(
            f"modules_to_save={config.modules_to_save}: whole trained modules are not LoRA tensors"
        )
    if config.trainable_token_indices:
        reasons.append(
            "trainable_token_indices: trained token rows are not LoRA tensors (and a grown "
            "vocabulary needs the merged model's own tokenizer)"
        )
    model_config = lora.base_model.model.config
    tied = bool(getattr(model_config, "tie_word_embeddings", False))
    for name, layer in lora.lora_layers():
        if adapter not in layer.r:
            continue
        if isinstance(layer, LoraEmbedding):
            reasons.append(f"{name}: an adapter on the embedding")
        elif name.endswith("lm_head") and tied:
            reasons.append(
                f"{name}: the output layer is tied to the embedding, so llama.cpp has no "
                "output tensor to apply it to"
            )
    return reasons


def lora_tensors(lora: LoraModel, adapter: str = "default") -> list[tuple[str, torch.Tensor]]:
    """(llama.cpp name, tensor) pairs of a GGUF LoRA file: `<weight>.lora_a` (r, in) and
    `<weight>.lora_b` (out, r) with the module's scale folded into B."""
    reasons = refusals(lora, adapter)
    if reasons:
        raise AdapterError(
            "cannot write this adapter as a GGUF LoRA file: "
            + "; ".join(reasons)
            + f"; nothing was written. {_MERGE_INSTEAD}"
        )
    config = lora.base_model.model.config
    out = []
    for name, layer in lora.lora_layers():
        if adapter not in layer.r:
            continue
        a, b = (w.detach().float() for w in layer.lora_weights(adapter))
        hf_name = f"{name}.weight"
        gguf_name = gguf_tensor_name(config, hf_name)
        scaled = layout(config, hf_name, b * layer.scaling[adapter])
        out += [(f"{gguf_name}.lora_a", a), (f"{gguf_name}.lora_b", scaled)]
    if not out:
        raise AdapterError(f"adapter `{adapter}` has no LoRA layers to export; nothing was written")
    return out


@torch.no_grad()
def folded_error(lora: LoraModel, adapter: str = "default") -> float:
    """Largest |scale B A - lorakit's delta weight| over the adapter's layers (before the row
    reordering): what folding the scale into B changed, in fp32."""
    worst = 0.0
    for _, layer in lora.lora_layers():
        if adapter not in layer.r:
            continue
        a, b = (w.detach().float() for w in layer.lora_weights(adapter))
        delta = layer.delta_weight(adapter).float()
        worst = max(worst, float(((b * layer.scaling[adapter]) @ a - delta).abs().max()))
    return worst


def write_lora_metadata(writer: Any, base_name: str | None) -> None:
    """An adapter file's metadata: type lora, alpha 0 (llama.cpp applies the scale 1, since
    each B carries its own)."""
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", 0.0)
    if base_name:
        writer.add_string("general.base_model.0.name", str(base_name))
