"""peft's documentation on new tokens, run with `from peft import ...` and with
`from lorakit import ...`: the trainable-tokens snippets of `package_reference/lora.md` and
`developer_guides/troubleshooting.md` (the hub model replaced by a tiny local folder, the only
other change), and the `ensure_weight_tying` table for `trainable_token_indices`, row by row.
Both libraries run the same lines; the tests compare what they produce."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import lorakit
from tiny_folders import save_tiny

LIBRARIES = [peft, lorakit]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("tiny") / "model"))


def lora_md_snippet(lib, folder: str, out) -> dict:
    """package_reference/lora.md, "Efficiently train tokens alongside LoRA"."""
    torch.manual_seed(0)
    base_model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)

    # we define our new tokens and add them to the tokenizer as special tokens
    special_tokens = ["<|start_think|>", "<|stop_think|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": special_tokens})

    # make room for new tokens in the embedding matrix if it isn't big enough already
    base_model.resize_token_embeddings(
        max(len(tokenizer), base_model.model.embed_tokens.num_embeddings)
    )

    # typical LoRA config with `trainable_token_indices` targeting embedding layer `embed_tokens`
    # and specifically our new tokens we just added
    lora_config = lib.LoraConfig(
        target_modules="all-linear",
        trainable_token_indices={"embed_tokens": tokenizer.convert_tokens_to_ids(special_tokens)},
    )
    peft_model = lib.get_peft_model(base_model, lora_config)

    # proceed to train the model like normal (here: a few steps of plain SGD)
    return _train_and_save(peft_model, tokenizer, "<|start_think|> hi <|stop_think|>", out)


def troubleshooting_snippet(lib, folder: str, out) -> dict:
    """developer_guides/troubleshooting.md, "Using trainable tokens"."""
    torch.manual_seed(0)
    base_model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)

    new_tokens = ["<think>", "</think>"]
    tokenizer.add_tokens(new_tokens)
    base_model.resize_token_embeddings(len(tokenizer))

    lora_config = lib.LoraConfig(
        target_modules=["q_proj", "v_proj"],
        trainable_token_indices={"embed_tokens": tokenizer.convert_tokens_to_ids(new_tokens)},
    )
    model = lib.get_peft_model(base_model, lora_config)
    return _train_and_save(model, tokenizer, "<think> a </think>", out)


def _train_and_save(model, tokenizer, text: str, out) -> dict:
    ids = tokenizer(text, return_tensors="pt").input_ids
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(out)
    with torch.no_grad():
        logits = model(ids).logits
    return {
        "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
        "logits": logits,
        "files": load_file(out / "adapter_model.safetensors"),
    }


@pytest.mark.parametrize("snippet", [lora_md_snippet, troubleshooting_snippet])
def test_new_token_snippets_run_as_in_peft(snippet, folder, tmp_path):
    ours = snippet(lorakit, folder, tmp_path / "lorakit")
    theirs = snippet(peft, folder, tmp_path / "peft")
    assert ours["trainable"] == theirs["trainable"]
    assert any("trainable_tokens_delta" in n for n in ours["trainable"])
    assert sorted(ours["files"]) == sorted(theirs["files"])
    for key, tensor in theirs["files"].items():
        assert torch.allclose(ours["files"][key], tensor, atol=1e-5), key
    assert torch.allclose(ours["logits"], theirs["logits"], atol=1e-4)


# ------------------------------------------------- the ensure_weight_tying table, row by row

SAME = {"lm_head": [1, 2], "embed_tokens": [1, 2]}
APART = {"lm_head": [1, 2], "embed_tokens": [3, 4]}
TABLE = [
    (tied, ensure, shape)
    for shape in ([1, 2, 3], SAME, APART)
    for tied in (False, True)
    for ensure in (False, True)
]


def _tiny(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config)


def table_row(lib, tied: bool, ensure: bool, shape) -> tuple:
    """What a row of the table does: the error, or (warned, wrapped layers, head tied)."""
    config = lib.LoraConfig(
        target_modules=["q_proj"], trainable_token_indices=shape, ensure_weight_tying=ensure
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = lib.get_peft_model(_tiny(tied), config)
        except ValueError as error:
            return ("error", str(error).split(".")[0])
    warned = any("does not have tied weights" in str(w.message) for w in caught)
    base = model.get_base_model()
    wrapped = sorted(
        n
        for n, m in base.named_modules()
        if n.endswith(("embed_tokens", "lm_head")) and hasattr(m, "token_adapter")
    )
    head, embedding = base.lm_head, base.model.embed_tokens
    shared = hasattr(head, "token_adapter") and (
        head.token_adapter.trainable_tokens_delta is embedding.token_adapter.trainable_tokens_delta
    )
    return (warned, wrapped, shared)


@pytest.mark.parametrize(("tied", "ensure", "shape"), TABLE)
def test_ensure_weight_tying_table_rows_behave_as_in_peft(tied, ensure, shape):
    assert table_row(lorakit, tied, ensure, shape) == table_row(peft, tied, ensure, shape)
