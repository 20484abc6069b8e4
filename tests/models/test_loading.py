"""Base models: local folders, hub ids offline, names and options checked, quantized loading.

The built-in model and its cache: test_models_builtin.py; chat templates: test_templates.py.
"""

from __future__ import annotations

import time

import pytest
import torch

from conftest import make_tiny_llama
from lorakit.errors import ModelError
from lorakit.models import ModelConfig, load_model, load_tokenizer


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


def test_loading_a_local_folder_prints_no_weights_bar(tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    from lorakit.models import load_model
    from tiny_folders import save_tiny

    folder = save_tiny(tmp_path / "tiny")
    hf_logging.enable_progress_bar()
    load_model(str(folder))
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # restored for downloads and other code
