"""`compat.fields`: peft's tables that `LoraConfig` reads, and the peft-only names it answers."""

from __future__ import annotations

import pytest

import lorakit
from lorakit.errors import ConfigError
from lorakit.lora.compat.fields import TASK_TYPES, UNSUPPORTED_FEATURES, TaskType


def test_task_types_are_listed_once():
    assert TASK_TYPES == (
        "SEQ_CLS",
        "SEQ_2_SEQ_LM",
        "CAUSAL_LM",
        "TOKEN_CLS",
        "QUESTION_ANS",
        "FEATURE_EXTRACTION",
    )
    assert lorakit.TaskType is TaskType and str(TaskType.CAUSAL_LM) == "CAUSAL_LM"
    with pytest.raises(ConfigError, match="Must be one of the following task types: SEQ_CLS, "):
        lorakit.LoraConfig(task_type="CAUSAL")


def test_unsupported_features_are_refused_and_written_at_their_defaults():
    with pytest.raises(ConfigError, match="`use_qalora`=True is not supported by lorakit"):
        lorakit.LoraConfig(use_qalora=True)
    written = lorakit.LoraConfig().to_dict()
    assert {k: written[k] for k in UNSUPPORTED_FEATURES} == UNSUPPORTED_FEATURES


def test_peft_only_names_of_a_config(tmp_path):
    config = lorakit.LoraConfig(revision="v2")
    assert (config.peft_type, config.is_prompt_learning, config.is_adaption_prompt) == (
        "LORA",
        False,
        False,
    )
    config.save(tmp_path)
    data = lorakit.LoraConfig.from_json_file(tmp_path / "adapter_config.json")
    assert data["revision"] == "v2" and data["peft_type"] == "LORA"
