"""The built-in model and tokenizer, loaded once per test process (the conversion is cached
in LORAKIT_HOME, so a CI run converts the GGUF at most once)."""

from __future__ import annotations

import copy
import functools

from lorakit.models import load_model, load_tokenizer


@functools.cache
def _loaded_tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


def builtin_tokenizer():
    """The SmolLM2-135M-Instruct tokenizer (ChatML template): a copy of the one loaded, so a test
    that changes its tokens or template changes no other test's."""
    return copy.deepcopy(_loaded_tokenizer())


@functools.cache
def builtin_model():
    """SmolLM2-135M-Instruct in fp32, eval mode; tests must not change its weights."""
    return load_model("smollm2-135m-instruct", dtype="float32").eval()
