"""`inspect --for`: what vLLM, llama.cpp and older peft will refuse or compute differently."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lorakit import LoraConfig
from lorakit.cli.main import main
from lorakit.lora.consumers import RULES, Facts, findings


def _adapter(path, keys=("model.layers.0.self_attn.q_proj",), r=8, **config):
    LoraConfig(r=r, lora_alpha=16, target_modules=["q_proj"], **config).save_pretrained(path)
    tensors = {}
    for key in keys:
        tensors[f"base_model.model.{key}.lora_A.weight"] = torch.zeros(r, 32)
        tensors[f"base_model.model.{key}.lora_B.weight"] = torch.zeros(32, r)
        if config.get("use_dora"):
            tensors[f"base_model.model.{key}.lora_magnitude_vector"] = torch.ones(32)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def _facts(path):
    from lorakit.lora.adapters import read_adapter

    files = read_adapter(path)
    raw = json.loads((path / "adapter_config.json").read_text())
    return Facts(files.config, sorted(files.tensors), raw)


def _whats(path, consumer):
    return [(f.level, f.what) for f in findings(_facts(path), consumer)]


def test_a_dora_adapter(tmp_path):
    path = _adapter(tmp_path / "dora", use_dora=True)
    assert ("refuses", "DoRA adapter (use_dora)") in _whats(path, "vllm")
    assert ("refuses", "DoRA adapter (use_dora)") in _whats(path, "llama.cpp")


def test_an_r64_adapter(tmp_path):
    path = _adapter(tmp_path / "r64", r=64)
    (level, what), *_ = _whats(path, "vllm")
    assert level == "refuses"
    assert what == "rank 64 > vLLM's default max_lora_rank 16 (start vLLM with --max-lora-rank 64)"
    assert not [w for w in _whats(path, "llama.cpp")]
    r8 = _adapter(tmp_path / "r8", r=8)
    assert _whats(r8, "vllm") == []


def test_an_moe_expert_adapter(tmp_path):
    keys = [f"model.layers.0.mlp.experts.{e}.gate_proj" for e in range(4)]
    path = _adapter(tmp_path / "moe", keys=keys)
    for consumer in ("vllm", "llama.cpp", "peft"):
        hits = [w for _, w in _whats(path, consumer) if "per-expert" in w]
        assert hits == ["adapters on per-expert modules (4 experts, e.g. experts.0)"], consumer


def test_rslora_and_patterns_for_llama_cpp_and_vllm(tmp_path):
    path = _adapter(tmp_path / "rs", use_rslora=True, alpha_pattern={"q_proj": 4})
    assert ("differs", "use_rslora, alpha_pattern: scale is not lora_alpha / r") in _whats(
        path, "llama.cpp"
    )
    assert ("differs", "alpha_pattern set: per-module scales") in _whats(path, "vllm")


def test_peft_keys(tmp_path):
    path = _adapter(tmp_path / "plain")
    (level, what), *rest = _whats(path, "peft")
    assert level == "refuses" and what.startswith("peft < 0.14.0 fails on keys it does not know")
    assert rest == []  # every newer key holds its default


def test_every_rule_names_a_source_and_a_fix():
    assert all(rule.source and rule.fix for rule in RULES)
    assert {rule.consumer for rule in RULES} == {"vllm", "llama.cpp", "peft"}


def test_the_command(tmp_path, capsys):
    path = _adapter(tmp_path / "dora", use_dora=True, r=32)
    assert main(["inspect", str(path), "--for", "vllm"]) == 0
    out = capsys.readouterr().out
    assert "for vllm: 2 issue(s)" in out and "--max-lora-rank 32" in out
    assert "vLLM does not yet support DoRA" in out
    assert main(["inspect", str(path), "--for", "tgi"]) == 1
    with pytest.raises(ValueError, match="expected one of vllm, llama.cpp, peft"):
        findings(_facts(path), "tgi")
