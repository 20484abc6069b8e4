"""Every shipped config validates, the packaged copies match, and LoRA targets exist in a tiny
model of each config's architecture."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorakit.jobs.run_config import load_run_config
from lorakit.lora.inject import find_targets

ROOT = Path(__file__).parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
PACKAGED = ROOT / "src" / "lorakit" / "configs"
FAMILY = {
    "smollm2": "llama",
    "llama": "llama",
    "qwen": "qwen2",
    "gpt2": "gpt2",
    "pythia": "gpt_neox",
}


def tiny_model(model_type: str):
    """A 2-layer random model of this architecture."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = {"vocab_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    if model_type == "gpt2":
        sizes = {"vocab_size": 64, "n_layer": 2, "n_head": 4, "n_embd": 32}
    else:
        sizes.update(hidden_size=32, intermediate_size=64)
    config = AutoConfig.for_model(model_type, **sizes)
    return AutoModelForCausalLM.from_config(config)


def test_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {"smollm2-lora.yaml", "smollm2-qlora.yaml", "smollm2-full.yaml"} <= names
    assert len(names) >= 7


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_and_targets_exist(path):
    config = load_run_config(path)
    assert (PACKAGED / path.name).read_text() == path.read_text(), "run: cp configs/*.yaml " + str(
        PACKAGED
    )
    family = FAMILY[path.name.split("-")[0]]
    if config.method != "full":
        model = tiny_model(family)
        lora = config.lora.to_lora_config()
        assert find_targets(model, lora)


def test_packaged_configs_have_no_strays():
    assert {p.name for p in PACKAGED.glob("*.yaml")} == {p.name for p in CONFIGS}


SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))


def test_the_three_studies_are_shipped():
    assert {p.name for p in SWEEPS} == {"ranks.yaml", "targets.yaml", "full-vs-lora.yaml"}
    assert {p.name for p in (PACKAGED / "sweeps").glob("*.yaml")} == {p.name for p in SWEEPS}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_validates_and_its_targets_exist(path):
    from lorakit.jobs.sweep import plan_sweep

    assert (PACKAGED / "sweeps" / path.name).read_text() == path.read_text(), (
        "run: cp configs/sweeps/*.yaml src/lorakit/configs/sweeps/"
    )
    plan = plan_sweep(path)
    assert len(plan.variants) >= 4
    model = tiny_model("llama")
    for variant in plan.variants:
        assert variant.run.model.name_or_path == "smollm2-135m-instruct"
        assert variant.run.eval.exact_match and variant.run.data.dataset == "arithmetic"
        if variant.run.method == "lora":
            assert find_targets(model, variant.run.lora.to_lora_config()), variant.name
