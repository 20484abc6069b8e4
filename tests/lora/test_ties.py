"""Merging an adapter on a layer whose weight is tied to another (lm_head and the embedding)."""

from __future__ import annotations

import copy

import pytest
import torch

from lorakit import LoraConfig, get_peft_model


def tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


IDS = torch.tensor([[1, 5, 9, 3, 60]])


@pytest.mark.parametrize("targets", [["lm_head", "q_proj"], ["embed_tokens"]])
def test_merge_and_unload_keeps_a_tied_weight_apart(targets, tmp_path):
    """The merged model equals the unmerged one (before this, the update also reached the tied
    layer: logits off by up to 9), the other layer keeps its weight, and the merged model saves
    and reloads as itself."""
    from transformers import AutoModelForCausalLM

    base = tied_llama()
    plain = copy.deepcopy(base.model.embed_tokens.weight)
    model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=2, target_modules=targets, init_lora_weights=False)
    )
    with torch.no_grad():
        want = model(input_ids=IDS).logits
        with pytest.warns(UserWarning, match="tied to another layer"):
            merged = model.merge_and_unload()
        got = merged(input_ids=IDS).logits
    assert (want - base(input_ids=IDS).logits).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    other = merged.model.embed_tokens if "lm_head" in targets else merged.lm_head
    torch.testing.assert_close(other.weight, plain, rtol=0, atol=0)
    assert merged.config.tie_word_embeddings is False
    merged.save_pretrained(tmp_path)
    with torch.no_grad():
        back = AutoModelForCausalLM.from_pretrained(tmp_path)(input_ids=IDS).logits
    torch.testing.assert_close(back, want, rtol=0, atol=1e-5)


def test_merge_adapter_unties_and_unmerge_restores():
    base = tied_llama()
    model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False)
    )
    with torch.no_grad():
        want = model(input_ids=IDS).logits
        with pytest.warns(UserWarning, match="tied to another layer"):
            model.merge_adapter()
        torch.testing.assert_close(model(input_ids=IDS).logits, want, rtol=0, atol=1e-5)
        model.unmerge_adapter()
        with model.disable_adapter():
            torch.testing.assert_close(
                model(input_ids=IDS).logits, base(input_ids=IDS).logits, rtol=0, atol=1e-5
            )


def test_untied_weights_are_merged_in_place():
    """No copy where nothing is shared: q_proj's Parameter stays the same object."""
    import warnings

    base = tied_llama()
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    weight = layer.base_layer.weight
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.merge_adapter()
    assert layer.base_layer.weight is weight
    assert model.base_model.model.config.tie_word_embeddings is True
