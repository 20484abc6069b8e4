"""The tokenizer as GGUF metadata: tokens, types, merges, pre-tokenizer name, special ids."""

from __future__ import annotations

import json

import gguf
import pytest

from builtin_model import builtin_tokenizer
from lorakit.errors import ModelError
from lorakit.models.gguf_vocab import pre_tokenizer_name, vocab_fields


def test_the_builtin_tokenizer_fields():
    tokenizer = builtin_tokenizer()
    fields = vocab_fields(tokenizer, 49152 + 3)
    assert len(fields.tokens) == len(fields.types) == 49155
    assert fields.tokens[1] == "<|im_start|>" and fields.types[1] == gguf.TokenType.CONTROL
    assert fields.types[1000] == gguf.TokenType.NORMAL
    assert fields.tokens[-1] == "[PAD49154]" and fields.types[-1] == gguf.TokenType.UNUSED
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    assert len(fields.merges) == len(data["model"]["merges"])
    assert fields.merges[0] == " ".join(data["model"]["merges"][0])
    assert fields.pre == "gpt-2"
    assert fields.special == {"bos": 1, "eos": 2, "unk": 0, "pad": 2}
    assert not fields.add_bos and not fields.add_eos


def test_a_vocabulary_larger_than_the_model_is_refused():
    with pytest.raises(ModelError, match="49152 tokens but the model's vocab_size is 100"):
        vocab_fields(builtin_tokenizer(), 100)


def test_pre_tokenizer_names():
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    byte_level = {"type": "ByteLevel", "use_regex": False}
    split = {"type": "Split", "pattern": {"Regex": PRETOKENIZE_REGEX}}
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [split, byte_level]}) == "qwen2"
    llama3 = {
        "type": "Split",
        "pattern": {"Regex": PRETOKENIZE_REGEX.replace(r"\p{N}|", r"\p{N}{1,3}|")},
    }
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [llama3, byte_level]}) == (
        "llama-bpe"
    )
    digits = {"type": "Digits", "individual_digits": True}
    regex = {"type": "ByteLevel", "use_regex": True}
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [digits, regex]}) == "smollm"
    other = {"type": "Split", "pattern": {"Regex": r"\w+"}}
    with pytest.raises(ModelError, match="no known llama.cpp name"):
        pre_tokenizer_name({"type": "Sequence", "pretokenizers": [other, byte_level]})


def test_a_sentencepiece_style_tokenizer_is_refused():
    class Fake:
        class backend_tokenizer:  # noqa: N801 - the attribute's name
            @staticmethod
            def to_str():
                return json.dumps({"model": {"type": "Unigram"}, "decoder": {"type": "Metaspace"}})

    with pytest.raises(ModelError, match="tokenizer model Unigram .* not SentencePiece"):
        vocab_fields(Fake(), 10)
