"""A LoRA adapter as GGUF LoRA tensors: each module's scale folded into B, exactly as lorakit
scales it (rsLoRA, rank_pattern, alpha_pattern); what such a file cannot hold is refused."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_tiny_llama
from lorakit import LoraConfig, get_peft_model
from lorakit.errors import AdapterError
from lorakit.jobs.export_lora import folded_error, lora_tensors
from lorakit.models.gguf_arch import interleave_rows

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]


def _lora(**kwargs):
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, **kwargs
    )
    return get_peft_model(make_tiny_llama(), config)


def test_scales_are_folded_into_b_per_module():
    lora = _lora(use_rslora=True, rank_pattern={"k_proj": 2}, alpha_pattern={"v_proj": 3})
    tensors = dict(lora_tensors(lora))
    assert len(tensors) == 2 * len(TARGETS) * 2  # a and b, 5 modules, 2 layers
    layers = dict(lora.lora_layers())
    # the scales written out: alpha / sqrt(r) with rsLoRA, the patterns per module
    expected = {"q_proj": 8 / 2, "k_proj": 8 / math.sqrt(2), "v_proj": 3 / 2, "gate_proj": 4}
    for module, scale in expected.items():
        path = f"model.layers.1.{'mlp' if module == 'gate_proj' else 'self_attn'}.{module}"
        layer = layers[path]
        assert layer.scaling["default"] == pytest.approx(scale)
        a, b = (w.detach() for w in layer.lora_weights("default"))
        gguf = {
            "q_proj": "attn_q",
            "k_proj": "attn_k",
            "v_proj": "attn_v",
            "gate_proj": "ffn_gate",
        }[module]
        stored_a = tensors[f"blk.1.{gguf}.weight.lora_a"]
        stored_b = tensors[f"blk.1.{gguf}.weight.lora_b"]
        assert stored_a.shape == a.shape and stored_b.shape == b.shape
        heads = {"q_proj": 4, "k_proj": 2}.get(module)
        delta = layer.delta_weight("default")
        want = interleave_rows(delta, heads) if heads else delta
        torch.testing.assert_close(stored_b @ stored_a, want, rtol=1e-5, atol=1e-6)
    assert folded_error(lora) < 1e-5


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"use_dora": True}, "DoRA adapter"),
        ({"bias": "lora_only"}, "bias='lora_only'"),
        ({"lora_bias": True}, "lora_bias=True"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
    ],
)
def test_what_a_lora_file_cannot_hold_is_refused(kwargs, reason):
    with pytest.raises(
        AdapterError, match=f"cannot write this adapter.*{reason}.*export it merged"
    ):
        lora_tensors(_lora(**kwargs))


def test_embedding_and_tied_output_adapters_are_refused():
    model = make_tiny_llama()
    model.config.tie_word_embeddings = True
    config = LoraConfig(r=2, target_modules=["embed_tokens", "lm_head"], init_lora_weights=False)
    lora = get_peft_model(model, config)
    with pytest.raises(AdapterError) as error:
        lora_tensors(lora)
    assert "model.embed_tokens: an adapter on the embedding" in str(error.value)
    assert "lm_head: the output layer is tied to the embedding" in str(error.value)
