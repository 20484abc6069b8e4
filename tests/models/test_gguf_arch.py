"""llama.cpp's names, layouts and hyper-parameters for each exported architecture."""

from __future__ import annotations

import pytest
import torch

from gguf_support import FAMILIES, make_family
from lorakit.errors import ModelError
from lorakit.models.gguf_arch import arch_of, interleave_rows, layout, model_tensors


def _llama_cpp_rope(x: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
    """llama.cpp's `llama` rotation, written out: pairs (2i, 2i+1) turned by pos * base^(-2i/d)."""
    d = x.shape[-1]
    theta = pos[:, None].float() * base ** (-torch.arange(0, d, 2).float() / d)  # (T, d/2)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * theta.cos() - odd * theta.sin()
    out[..., 1::2] = even * theta.sin() + odd * theta.cos()
    return out


def test_interleaved_rows_turn_transformers_rotary_into_llama_cpps():
    from transformers.models.llama.modeling_llama import (
        LlamaRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    model = make_family("llama", vocab_size=64)
    config, attn = model.config, model.model.layers[0].self_attn
    heads, dim, tokens = config.num_attention_heads, 16, 5
    x = torch.randn(tokens, config.hidden_size)
    pos = torch.arange(tokens)
    cos, sin = LlamaRotaryEmbedding(config)(x[None], pos[None])
    q = attn.q_proj(x).view(tokens, heads, dim).transpose(0, 1)[None]  # (1, H, T, d)
    hf_q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    w = interleave_rows(attn.q_proj.weight.detach(), heads)
    ours = (x @ w.T).view(tokens, heads, dim).transpose(0, 1)  # (H, T, d) in llama.cpp's order
    rotated = _llama_cpp_rope(ours, pos, config.rope_parameters["rope_theta"])
    reordered = interleave_rows(hf_q[0].permute(0, 2, 1).reshape(heads * dim, tokens), heads)
    torch.testing.assert_close(rotated.permute(0, 2, 1).reshape(heads * dim, tokens), reordered)


def test_interleave_is_a_permutation_of_rows_within_each_head():
    w = torch.arange(16.0).reshape(8, 2)  # 2 heads of 4 rows
    got = interleave_rows(w, 2)[:, 0].tolist()
    assert got == [0.0, 4.0, 2.0, 6.0, 8.0, 12.0, 10.0, 14.0]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_weight_gets_a_llama_cpp_name(family):
    model = make_family(family, vocab_size=64)
    tensors = dict(model_tensors(model.config, model.state_dict()))
    assert "token_embd.weight" in tensors and "output_norm.weight" in tensors
    assert "blk.1.ffn_down.weight" in tensors
    qkv = ["blk.0.attn_qkv.weight"] if family == "phi3" else ["blk.0.attn_q.weight"]
    assert all(name in tensors for name in qkv)
    assert ("output.weight" in tensors) == (not model.config.tie_word_embeddings)
    if family in ("qwen3", "gemma3"):
        assert "blk.0.attn_q_norm.weight" in tensors
    if family == "qwen2":
        assert "blk.0.attn_q.bias" in tensors


def test_gemma_norms_get_one_added_and_llama_q_k_rows_are_reordered():
    gemma = make_family("gemma2", vocab_size=64)
    norm = gemma.model.layers[0].input_layernorm.weight.detach()
    name = "model.layers.0.input_layernorm.weight"
    torch.testing.assert_close(layout(gemma.config, name, norm), norm + 1)
    llama = make_family("llama", vocab_size=64)
    k = llama.model.layers[0].self_attn.k_proj.weight.detach()
    moved = layout(llama.config, "model.layers.0.self_attn.k_proj.weight", k)
    torch.testing.assert_close(moved, interleave_rows(k, 2))  # the 2 KV heads
    qwen = make_family("qwen2", vocab_size=64)
    q = qwen.model.layers[0].self_attn.q_proj.weight.detach()
    assert torch.equal(layout(qwen.config, "model.layers.0.self_attn.q_proj.weight", q), q)


def test_other_architectures_are_refused_by_name(tiny_gpt2):
    with pytest.raises(ModelError, match="architecture `gpt2`.*supported: gemma2"):
        arch_of(tiny_gpt2.config)


def test_gemma2_with_its_own_lm_head_is_refused():
    model = make_family("gemma2", vocab_size=64)
    model.config.tie_word_embeddings = False
    state = {**model.state_dict(), "lm_head.weight": torch.zeros(64, 64)}
    with pytest.raises(ModelError, match="gemma2 in llama.cpp always reads its output"):
        model_tensors(model.config, state)


def test_a_rope_kind_llama_cpp_is_not_told_about_is_refused():
    from lorakit.models.gguf_arch import write_hparams

    model = make_family("llama", vocab_size=64)
    model.config.rope_parameters = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    with pytest.raises(ModelError, match="rope_type `yarn`"):
        write_hparams(object(), model.config)
