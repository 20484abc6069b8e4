"""docs/peft-compatibility.md's table lists every public peft name it must, and tells the truth."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import peft
import pytest
from torch import nn

import lorakit
from conftest import make_tiny_llama
from lorakit.errors import LorakitError

DOC = Path(__file__).resolve().parents[3] / "docs" / "peft-compatibility.md"
TOP_LEVEL = [
    "LoraConfig",
    "PeftConfig",
    "TaskType",
    "get_peft_model",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftModelForQuestionAnswering",
    "PeftModelForFeatureExtraction",
    "LoraModel",
    "prepare_model_for_kbit_training",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
    "PeftType",
    "AutoPeftModelForCausalLM",
]


def _table(section: str = "## The table") -> dict[str, str]:
    text = DOC.read_text().split(section, 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| (\w+) \|", text, flags=re.M)
    return dict(rows)


def test_every_public_peft_name_is_in_the_table():
    methods = [
        n for n in dir(peft.PeftModel) if not n.startswith("_") and not hasattr(nn.Module, n)
    ]
    assert set(TOP_LEVEL) | set(methods) <= set(_table())


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_top_level_names_exist(name):
    assert _table()[name] in ("same", "different")
    assert hasattr(lorakit, name) and hasattr(peft, name)


def test_each_method_status_holds():
    model = lorakit.get_peft_model(make_tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"]))
    for name, status in _table().items():
        if name in TOP_LEVEL:
            continue
        if status in ("same", "different"):
            assert hasattr(model, name), name
        elif status == "absent":
            assert not hasattr(model, name), name
        else:
            with pytest.raises(LorakitError, match="not supported by lorakit"):
                getattr(model, name)("some/repo")


def test_peft_refusals_say_not_supported():
    with pytest.raises(LorakitError, match="not supported by lorakit"):
        lorakit.get_peft_model(nn.Sequential(nn.Linear(2, 2)), lorakit.LoraConfig(r=1), mixed=True)


def test_variant_rows_hold():
    rows = _table("## LoRA variants and initialisations")
    assert {"use_dora=True", "init_lora_weights='pissa'", "init_lora_weights='loftq'"} <= set(rows)
    for setting, status in rows.items():
        field, value = setting.split("=", 1)
        kwargs = {field: ast.literal_eval(value), "target_modules": ["q_proj"]}
        if field == "init_lora_weights" and kwargs[field] == "loftq":
            kwargs["loftq_config"] = {"loftq_bits": 4, "loftq_iter": 1}
        if status == "refused":
            with pytest.raises(LorakitError, match="not supported by lorakit"):
                lorakit.LoraConfig(**kwargs)
        else:
            model = lorakit.get_peft_model(make_tiny_llama(), lorakit.LoraConfig(**kwargs))
            assert getattr(model.peft_config["default"], field) == kwargs[field]
