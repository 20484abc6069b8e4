"""A decode step for Llama-family models without the Hugging Face plumbing around the math.

In a decode step each op works on one token per row, so the ops are cheap and the Python around
them is not: transformers' Llama forward passes each layer through four module calls, keyword
plumbing, deprecation wrappers and hub-kernel dispatch before any math runs (a 30-layer model
with hidden size 64 spends ~9 ms a step there). `LlamaDecode` runs the same step as one loop:
the same ops in the same order on the same tensors. The projections (q, k, v, o, gate, up,
down, lm_head) are still called as the model's own modules, so LoRA layers, per-row adapters,
fused groups and prepacked weights work as in the ordinary forward; the attention is
transformers' own SDPA function with transformers' own mask, and the KV cache is updated
through the cache's `update`. The logits equal the ordinary forward's bit for bit (checked by
the tests on padded and unpadded batches).

It applies to `LlamaForCausalLM`, `MistralForCausalLM` and `Qwen2ForCausalLM` themselves (not
subclasses) on the CPU with SDPA attention, SiLU MLPs and the family's standard modules carrying
no hooks, under transformers 5 (whose forwards it mirrors); anything else returns None from
`for_model` and the engine calls the model as usual.
"""

from __future__ import annotations

import importlib
import inspect

import torch
import torch.nn.functional as F
from torch import nn

_FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}  # module: class prefix


class LlamaDecode:
    """One decode step of a Llama-family model: (input_ids (B, 1), positions, mask, cache) ->
    logits. Llama, Mistral and Qwen2 share the block; they differ in which attention mask each
    layer gets (Mistral: a sliding window when the config sets one; Qwen2: per `layer_types`),
    and that is taken from the same transformers functions their forwards call."""

    def __init__(self, model: nn.Module, masks: list) -> None:
        self.model = model
        self.inner = model.model
        self.config = self.inner.config
        self.layers = list(self.inner.layers[: self.config.num_hidden_layers])
        self.masks = masks  # per layer: the mask function its forward would use

    @classmethod
    def for_model(cls, model: nn.Module) -> LlamaDecode | None:
        """A lean step for `model`, or None where it does not apply (see the module's text).
        Types and hooks are checked here, once: the server builds it anew when its model
        changes, not when a hook is added later."""
        family = next(
            (
                f
                for f, prefix in _FAMILIES.items()
                if type(model).__name__ == f"{prefix}ForCausalLM"
            ),
            None,
        )
        if family is None:
            return None
        try:
            from transformers import masking_utils

            classes = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        except ImportError:
            return None
        if "cache" not in inspect.signature(masking_utils.create_causal_mask).parameters:
            return None  # transformers 4.x: its forward takes other arguments; run that one
        prefix = _FAMILIES[family]
        kind = {part: getattr(classes, f"{prefix}{part}", None) for part in _PARTS}
        if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return None
        config = model.config
        if (
            getattr(config, "_attn_implementation", None) != "sdpa"
            or config.hidden_act != "silu"
            or getattr(model, "use_kernels", False)
            or next(model.parameters()).device.type != "cpu"
        ):
            return None
        inner = model.model
        expected = [
            (model, "ForCausalLM"),
            (inner, "Model"),
            (inner.rotary_emb, "RotaryEmbedding"),
            (inner.norm, "RMSNorm"),
        ]
        for layer in inner.layers:
            expected += [
                (layer, "DecoderLayer"),
                (layer.self_attn, "Attention"),
                (layer.mlp, "MLP"),
                (layer.input_layernorm, "RMSNorm"),
                (layer.post_attention_layernorm, "RMSNorm"),
            ]
        if any(
            type(module) is not kind[part] or module._forward_hooks or module._forward_pre_hooks
            for module, part in expected
        ):
            return None
        full, sliding = (
            masking_utils.create_causal_mask,
            masking_utils.create_sliding_window_causal_mask,
        )
        layers = range(config.num_hidden_layers)
        if family == "qwen2":
            by_type = {"full_attention": full, "sliding_attention": sliding}
            masks = [by_type.get(config.layer_types[i]) for i in layers]
        elif family == "mistral":
            masks = [full if config.sliding_window is None else sliding for _ in layers]
        else:
            masks = [full for _ in layers]
        return None if None in masks else cls(model, masks)

    @torch.no_grad()
    def __call__(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache,
    ) -> torch.Tensor:
        """The logits (B, 1, vocab) of one step; `cache` gets this step's keys and values."""
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        inner = self.inner
        h = inner.embed_tokens(input_ids)
        made = {}  # one mask per mask function, as the forward builds them
        for make in self.masks:
            if make not in made:
                made[make] = make(
                    config=self.config,
                    inputs_embeds=h,
                    attention_mask=attention_mask,
                    cache=cache,
                    position_ids=position_ids,
                )
        cos, sin = inner.rotary_emb(h, position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        for index, (layer, make) in enumerate(zip(self.layers, self.masks, strict=True)):
            attn, mlp = layer.self_attn, layer.mlp
            shape = (*h.shape[:-1], -1, attn.head_dim)
            x = _rms_norm(h, layer.input_layernorm)
            q = attn.q_proj(x).view(shape).transpose(1, 2)
            k = attn.k_proj(x).view(shape).transpose(1, 2)
            v = attn.v_proj(x).view(shape).transpose(1, 2)
            q = (q * cos) + (_rotate_half(q) * sin)
            k = (k * cos) + (_rotate_half(k) * sin)
            k, v = cache.update(k, v, index)
            dropout = attn.attention_dropout if attn.training else 0.0
            out, _ = sdpa_attention_forward(attn, q, k, v, made[make], dropout, attn.scaling)
            h = h + attn.o_proj(out.reshape(*shape[:-2], -1).contiguous())
            x = _rms_norm(h, layer.post_attention_layernorm)
            h = h + mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        return self.model.lm_head(_rms_norm(h, inner.norm))


_PARTS = ("ForCausalLM", "Model", "RotaryEmbedding", "RMSNorm", "DecoderLayer", "Attention", "MLP")


def _rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """LlamaRMSNorm's forward, op for op."""
    dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + norm.variance_epsilon)
    return norm.weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
