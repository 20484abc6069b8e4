"""What `save_pretrained` writes into adapter_config.json is loadable elsewhere: class-name targets
become the module names peft matches, and `base_model_name_or_path` is a name another machine can
resolve (the built-in alias, not this machine's cache folder)."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from torch import nn

import lorakit
from conftest import make_tiny_llama


def readme_model() -> nn.Module:
    return nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 10))


def saved_targets(model: nn.Module, tmp_path, **config) -> list[str] | str:
    lora = lorakit.get_peft_model(model, lorakit.LoraConfig(r=4, lora_alpha=8, **config))
    lora.save_pretrained(tmp_path / "adapter")
    return json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]


def test_readme_snippet_adapter_loads_in_peft(tmp_path):
    base = readme_model()
    config = lorakit.LoraConfig(
        r=4, lora_alpha=32, target_modules=["Linear"], init_lora_weights=False
    )
    ours = lorakit.get_peft_model(copy.deepcopy(base), config)
    ours.save_pretrained(tmp_path / "my-adapter")
    saved = json.loads((tmp_path / "my-adapter" / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["0", "2"]  # the two nn.Linear layers by name
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "my-adapter")
    x = torch.randn(3, 128)
    torch.testing.assert_close(theirs(x), ours(x))
    assert not torch.allclose(ours(x), base(x))  # B is random here, so the adapter shows
    # the in-memory config keeps what the user wrote
    assert ours.peft_config["default"].target_modules == ["Linear"]


def test_class_name_targets_on_a_transformer(tmp_path):
    names = saved_targets(make_tiny_llama(), tmp_path, target_modules=["Linear"])
    # every nn.Linear, lm_head included (as the class-name rule matches), by its last name part
    assert names == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    )


def test_class_name_mixed_with_names_and_layer_choice(tmp_path):
    names = saved_targets(
        make_tiny_llama(), tmp_path, target_modules=["Linear", "q_proj"], layers_to_transform=[1]
    )
    # the layer choice is saved too, so the last name parts are exact (lm_head is in no layer)
    assert names == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


def test_names_that_would_overmatch_become_an_exact_regex(tmp_path):
    inner = nn.Sequential(nn.Linear(4, 4))
    base = nn.Sequential(
        nn.Linear(4, 4), nn.ReLU(), nn.ModuleDict({"0": nn.Identity(), "x": inner})
    )
    config = lorakit.LoraConfig(
        r=2, lora_alpha=4, target_modules=["Linear"], init_lora_weights=False
    )
    ours = lorakit.get_peft_model(copy.deepcopy(base), config)
    ours.save_pretrained(tmp_path)
    # "0" (even as a full name) would also match the Identity `2.0`, which LoRA cannot wrap
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == (
        r"0|2\.x\.0"
    )
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    x = torch.randn(2, 4)
    torch.testing.assert_close(theirs.base_model.model[2]["x"](x), ours.base_model.model[2]["x"](x))
    torch.testing.assert_close(theirs.base_model.model[0](x), ours.base_model.model[0](x))


def test_name_and_regex_targets_are_written_as_given(tmp_path):
    assert saved_targets(make_tiny_llama(), tmp_path, target_modules=["q_proj", "v_proj"]) == [
        "q_proj",
        "v_proj",
    ]
    regex = r".*\.(q|v)_proj"
    assert saved_targets(make_tiny_llama(), tmp_path, target_modules=regex) == regex


@pytest.mark.slow
def test_builtin_base_is_recorded_by_its_alias(tmp_path):
    from builtin_model import builtin_model

    model = builtin_model()
    assert model.config.name_or_path == "smollm2-135m-instruct"
    lora = lorakit.get_peft_model(copy.deepcopy(model), lorakit.LoraConfig(target_modules="preset"))
    lora.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "smollm2-135m-instruct"


def test_all_linear_is_saved_as_names_and_old_all_linear_files_still_load(tmp_path):
    from moe_models import tiny_model

    base = tiny_model("qwen3_moe")
    saved = saved_targets(copy.deepcopy(base), tmp_path / "new", target_modules="all-linear")
    assert saved == ["k_proj", "o_proj", "q_proj", "v_proj"]
    # an adapter lorakit saved before it adapted experts: linear layers only, "all-linear"
    layers = ["k_proj", "o_proj", "q_proj", "v_proj"]
    old = lorakit.get_peft_model(
        copy.deepcopy(base),
        lorakit.LoraConfig(r=2, target_modules=layers, init_lora_weights=False),
    )
    old.save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / "adapter_config.json"
    written = json.loads(path.read_text())
    written.update(target_modules="all-linear", target_parameters=None)
    written.pop("peft_version", None)
    path.write_text(json.dumps(written))
    loaded = lorakit.LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "old")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, old(ids).logits)
    assert loaded.peft_config["default"].target_parameters == []
