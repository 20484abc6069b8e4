"""New tokens (lorakit.models.vocab): added to the tokenizer, the model grown to hold them (a
tied head stays tied), an adapter folder's tokenizer found and checked."""

from __future__ import annotations

import pytest
import torch

from builtin_model import builtin_tokenizer
from conftest import make_tiny_llama
from lorakit.errors import ConfigError
from lorakit.models.vocab import adapter_tokenizer, add_tokens, fit_vocabulary, has_tokenizer

VOCAB = 49152


def test_add_tokens_gives_one_id_each_and_grows_the_model():
    model, tokenizer = make_tiny_llama(vocab_size=VOCAB), builtin_tokenizer()
    ids = add_tokens(model, tokenizer, ["<|tool|>", "<|end_tool|>"])
    assert ids == [VOCAB, VOCAB + 1]
    assert model.get_input_embeddings().weight.shape[0] == VOCAB + 2
    assert model.get_output_embeddings().weight.shape[0] == VOCAB + 2
    encoded = tokenizer("a<|tool|>b<|end_tool|>").input_ids
    assert VOCAB in encoded and VOCAB + 1 in encoded
    assert "<|tool|>" not in tokenizer.decode(encoded, skip_special_tokens=True)


def test_a_tied_head_stays_tied():
    model = make_tiny_llama(vocab_size=VOCAB)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    add_tokens(model, builtin_tokenizer(), ["<x>"])
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_plain_tokens_and_a_larger_embedding():
    model, tokenizer = make_tiny_llama(vocab_size=VOCAB + 10), builtin_tokenizer()
    ids = add_tokens(model, tokenizer, ["zzqx"], special=False)
    assert ids == [VOCAB]
    assert model.get_input_embeddings().weight.shape[0] == VOCAB + 10  # room enough: kept
    assert not fit_vocabulary(model, tokenizer)


def test_a_token_listed_twice_is_refused():
    with pytest.raises(ConfigError, match="listed twice"):
        add_tokens(make_tiny_llama(vocab_size=VOCAB), builtin_tokenizer(), ["<a>", "<a>"])


def test_adapter_tokenizer_reads_the_folder_and_refuses_two_vocabularies(tmp_path):
    assert adapter_tokenizer([tmp_path]) is None and not has_tokenizer(tmp_path)
    one, two = builtin_tokenizer(), builtin_tokenizer()
    one.add_special_tokens({"additional_special_tokens": ["<a>"]})
    two.add_special_tokens({"additional_special_tokens": ["<b>"]})
    one.save_pretrained(tmp_path / "one")
    two.save_pretrained(tmp_path / "two")
    found = adapter_tokenizer([tmp_path, tmp_path / "one"])
    assert found.convert_tokens_to_ids("<a>") == VOCAB
    model = make_tiny_llama(vocab_size=VOCAB)
    assert fit_vocabulary(model, found)
    assert model.get_input_embeddings().weight.shape == torch.Size([VOCAB + 1, 32])
    with pytest.raises(ConfigError, match="different tokenizers"):
        adapter_tokenizer([tmp_path / "one", tmp_path / "two"])
