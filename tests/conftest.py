"""Shared fixtures: seeded RNGs and tiny random models of real architectures."""

from __future__ import annotations

import os
import random
import signal

import numpy as np
import pytest
import torch

torch.set_num_threads(2)
# Runs compared bit for bit keep their thread count on the loaded CI machine
# (lorakit.train.threads); test_threads.py turns the governor on where it tests it.
os.environ["LORAKIT_FIXED_THREADS"] = "1"
# A suite started in the background of a non-interactive shell (`cmd &`, nohup) inherits SIGINT
# ignored, and so would every command the tests start: Ctrl-C's tests need it as a terminal
# gives it.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True, scope="session")
def _data_cache(tmp_path_factory):
    """Token stores of the session's tests in their own cache, never the user's."""
    before = os.environ.get("LORAKIT_DATA_CACHE")
    os.environ["LORAKIT_DATA_CACHE"] = str(tmp_path_factory.mktemp("data-cache"))
    yield
    if before is None:
        os.environ.pop("LORAKIT_DATA_CACHE", None)
    else:
        os.environ["LORAKIT_DATA_CACHE"] = before


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def make_tiny_llama(vocab_size: int = 128, hidden: int = 32, layers: int = 2):
    """A LlamaForCausalLM with random weights: 2 layers, width 32, 4 heads / 2 KV heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def make_tiny_gpt2(vocab_size: int = 128, hidden: int = 32, layers: int = 2):
    """A GPT2LMHeadModel (Conv1D layers, fan_in_fan_out) with random weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=4, n_positions=256
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_gpt2():
    return make_tiny_gpt2()
