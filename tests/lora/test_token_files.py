"""Whole embedding / head weights in adapter files (lorakit.lora.token_files) against peft
0.22.0: written where a grown vocabulary's added rows are not all token rows, read where peft
wrote them, tied heads included."""

from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.errors import AdapterError

IDS = torch.tensor([[1, 32, 5, 33, 2]])


def grown(folder, tie: bool) -> LlamaForCausalLM:
    """A tiny Llama saved with 32 tokens, loaded and grown to 34 (random new rows)."""
    if not (folder / "config.json").exists():
        config = LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            tie_word_embeddings=tie,
        )
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder)
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    model.resize_token_embeddings(34)
    return model


def _randomise(model) -> None:
    torch.manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_()


ROWS = {
    "embedding-only": (False, [32, 33]),
    "tied": (True, [32, 33]),
    "both-untied": (False, {"embed_tokens": [32, 33], "lm_head": [32, 33]}),
}


@pytest.mark.parametrize("case", ROWS)
def test_peft_files_with_whole_layers_load_in_lorakit(case, tmp_path):
    tie, rows = ROWS[case]
    base = tmp_path / "base"
    config = {"target_modules": ["q_proj"], "trainable_token_indices": rows}
    theirs = peft.get_peft_model(grown(base, tie), peft.LoraConfig(**config))
    _randomise(theirs)
    theirs.save_pretrained(tmp_path / "peft")  # whole layers: peft saw the vocabulary grow
    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert any(k.endswith(("lm_head.weight", "base_layer.weight")) for k in saved)
    ours = lorakit.PeftModel.from_pretrained(grown(base, tie), tmp_path / "peft")
    with torch.no_grad():
        assert torch.allclose(ours(IDS).logits, theirs(IDS).logits, atol=1e-5)
        ours.merge_adapter()
        ours.unmerge_adapter()  # the base rows put back are the file's
        assert torch.allclose(ours(IDS).logits, theirs(IDS).logits, atol=1e-5)


@pytest.mark.parametrize("case", ROWS)
def test_lorakit_writes_whole_layers_only_where_rows_are_missing(case, tmp_path):
    tie, rows = ROWS[case]
    base = tmp_path / "base"
    config = {"target_modules": ["q_proj"], "trainable_token_indices": rows}
    ours = lorakit.get_peft_model(grown(base, tie), lorakit.LoraConfig(**config))
    theirs = peft.get_peft_model(grown(base, tie), peft.LoraConfig(**config))
    _randomise(ours)
    _randomise(theirs)
    ours.save_pretrained(tmp_path / "auto")
    ours.save_pretrained(tmp_path / "all", save_embedding_layers=True)
    theirs.save_pretrained(tmp_path / "peft")
    auto = load_file(tmp_path / "auto" / "adapter_model.safetensors")
    whole = [k for k in auto if k.endswith(("lm_head.weight", "base_layer.weight"))]
    assert bool(whole) == (case == "embedding-only")  # the head's new rows are random
    full = load_file(tmp_path / "all" / "adapter_model.safetensors")
    assert sorted(full) == sorted(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    for folder in ("auto", "all"):
        back = peft.PeftModel.from_pretrained(grown(base, tie), tmp_path / folder)
        with torch.no_grad():
            assert torch.allclose(back(IDS).logits, ours(IDS).logits, atol=1e-5), folder


def test_whole_layers_that_change_the_base_load_alone(tmp_path):
    base = tmp_path / "base"
    config = lorakit.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[32, 33])
    for folder, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)  # the rows the resize adds differ
        lorakit.get_peft_model(grown(base, False), config).save_pretrained(tmp_path / folder)
    loaded = lorakit.PeftModel.from_pretrained(grown(base, False), tmp_path / "a")
    with pytest.raises(AdapterError, match="load this adapter alone"):
        loaded.load_adapter(tmp_path / "b", "b")
