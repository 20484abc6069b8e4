"""LoraConfig: peft's fields, clear errors, adapter_config.json round trip."""

from __future__ import annotations

import json
import math
import warnings

import peft
import pytest

from lorakit import AdapterError, ConfigError, LoraConfig


def test_unknown_argument_names_itself_and_the_closest_field():
    with pytest.raises(
        ConfigError, match=r"unknown argument `lora_alhpa` \(did you mean `lora_alpha`\?\)"
    ):
        LoraConfig(lora_alhpa=16)


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("r", 0, "positive integer"),
        ("r", 2.5, "positive integer"),
        ("lora_alpha", -1, "positive number"),
        ("lora_dropout", 1.5, r"probability in \[0, 1\)"),
        ("bias", "some", "one of"),
        ("init_lora_weights", "eva", "not supported by lorakit"),
        ("target_modules", 3, "list of module names"),
    ],
)
def test_bad_values_name_field_value_and_allowed(field, value, allowed):
    with pytest.raises(ConfigError, match=rf"LoraConfig\.{field}={value!r}.*{allowed}"):
        LoraConfig(**{field: value})


def test_bad_regex_is_reported():
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        LoraConfig(target_modules="(q_proj")


def test_scaling_plain_and_rslora_and_patterns():
    config = LoraConfig(
        r=16, lora_alpha=32, rank_pattern={"v_proj": 4}, alpha_pattern={"v_proj": 8}
    )
    assert config.scaling_for("model.layers.0.q_proj") == 2.0  # 32 / 16
    assert config.scaling_for("model.layers.0.v_proj") == 2.0  # 8 / 4
    rs = LoraConfig(r=16, lora_alpha=32, use_rslora=True)
    assert math.isclose(rs.scaling_for("x"), 8.0)  # 32 / sqrt(16)


def test_unknown_fields_are_dropped_as_peft_drops_them(tmp_path):
    data = LoraConfig(r=4, target_modules=["q_proj"]).to_dict()
    data["some_future_field"] = None
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"Unexpected keyword arguments \['some_future_field'\]"):
        loaded = LoraConfig.load(tmp_path)
    assert loaded.r == 4 and "some_future_field" not in loaded.to_dict()
    assert loaded.to_dict() == LoraConfig(r=4, target_modules=["q_proj"]).to_dict()
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4}))
    with pytest.raises(AdapterError, match="no `peft_type`"):
        LoraConfig.load(tmp_path)


def test_unknown_non_default_field_warns_not_crashes(tmp_path):
    data = LoraConfig(r=4, target_modules=["q_proj"]).to_dict()
    data["some_future_field"] = {"x": 1}
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LoraConfig.load(tmp_path)
    assert any("some_future_field" in str(w.message) for w in caught)


def test_peft_written_config_reads_back_the_same(tmp_path):
    theirs = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True
    )
    theirs.save_pretrained(tmp_path)
    ours = LoraConfig.load(tmp_path)
    assert (ours.r, ours.lora_alpha, ours.use_rslora) == (8, 16, True)
    assert sorted(ours.target_modules) == ["q_proj", "v_proj"]


def test_missing_and_invalid_config_files(tmp_path):
    with pytest.raises(AdapterError, match="adapter_config.json: not found"):
        LoraConfig.load(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="adapter_config.json: not valid JSON"):
        LoraConfig.load(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": -3, "peft_type": "LORA"}))
    with pytest.raises(AdapterError, match=r"adapter_config.json: LoraConfig\.r=-3"):
        LoraConfig.load(tmp_path)
