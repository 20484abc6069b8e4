"""Tiny model folders on disk for CLI, merge and example tests: a random 2-layer Llama (or
GPT-2) with the built-in model's real tokenizer (vocab 49152, ChatML template)."""

from __future__ import annotations

from pathlib import Path

from builtin_model import builtin_tokenizer
from conftest import make_tiny_gpt2, make_tiny_llama

VOCAB = 49152  # the built-in tokenizer's vocabulary


def save_tiny(path: Path, family: str = "llama") -> Path:
    """Write a tiny random model of `family` ('llama' or 'gpt2') and the tokenizer to `path`."""
    maker = make_tiny_llama if family == "llama" else make_tiny_gpt2
    model = maker(vocab_size=VOCAB)
    model.config.eos_token_id = model.config.pad_token_id = builtin_tokenizer().eos_token_id
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.pad_token_id = model.config.eos_token_id
    model.save_pretrained(path, safe_serialization=True)
    builtin_tokenizer().save_pretrained(path)
    return path
