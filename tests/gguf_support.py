"""Tiny random models of each family lorakit exports to GGUF, and llama.cpp (through
llama-cpp-python) as the reference that reads the files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from builtin_model import builtin_tokenizer

VOCAB = 49152  # the built-in tokenizer's vocabulary
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")
LLAMA_CPP_MISSING = (
    "llama-cpp-python is not installed (pip install llama-cpp-python builds llama.cpp from "
    "source); the GGUF files cannot be checked by llama.cpp itself"
)


def make_family(family: str, vocab_size: int = VOCAB, tied: bool = False) -> torch.nn.Module:
    """A 2-layer random model of `family`: width 64, 4 heads / 2 KV heads of 16."""
    import transformers as tf

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
    )
    if family == "llama":
        config, cls = tf.LlamaConfig(**common), tf.LlamaForCausalLM
    elif family == "mistral":
        config, cls = (
            tf.MistralConfig(**common, head_dim=16, sliding_window=None),
            tf.MistralForCausalLM,
        )
    elif family == "qwen2":
        config, cls = tf.Qwen2Config(**common), tf.Qwen2ForCausalLM
    elif family == "qwen3":
        config, cls = tf.Qwen3Config(**common, head_dim=16), tf.Qwen3ForCausalLM
    elif family == "gemma2":
        common["tie_word_embeddings"] = True
        config = tf.Gemma2Config(**common, head_dim=16, query_pre_attn_scalar=16)
        cls = tf.Gemma2ForCausalLM
    elif family == "gemma3":
        config = tf.Gemma3TextConfig(**common, head_dim=16, query_pre_attn_scalar=16)
        cls = tf.Gemma3ForCausalLM
    elif family == "phi3":
        config, cls = tf.Phi3Config(**common, pad_token_id=0), tf.Phi3ForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():  # random norms and biases, so a wrong layout shows
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.1)
    return model


def save_family(path: Path, family: str, tied: bool = False) -> Path:
    """`make_family` with the built-in tokenizer, saved as a Hugging Face folder."""
    model = make_family(family, tied=tied)
    model.config.eos_token_id = builtin_tokenizer().eos_token_id
    model.save_pretrained(path, safe_serialization=True)
    builtin_tokenizer().save_pretrained(path)
    return path


def llama_cpp():
    """The llama_cpp module, or a skip saying why."""
    try:
        import llama_cpp as module
    except ImportError:
        pytest.skip(LLAMA_CPP_MISSING)
    return module


def llama_cpp_logits(model_path: Path, ids: list[int], lora: Path | None = None) -> np.ndarray:
    """llama.cpp's logits (T, V) for token ids, optionally with a GGUF LoRA file applied."""
    module = llama_cpp()
    llm = module.Llama(
        model_path=str(model_path),
        lora_path=str(lora) if lora else None,
        n_ctx=256,
        n_batch=256,
        logits_all=True,
        n_threads=2,
        verbose=False,
    )
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def torch_logits(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()
