"""check_run: what `train` refuses before its first step, found without a model; `validate`
and `train` run this one check (tests/cli/test_cli.py shows both commands agree)."""

from __future__ import annotations

import json

import pytest

from lorakit.errors import ConfigError, DataError, ModelError
from lorakit.jobs.preflight import check_run
from lorakit.jobs.run_config import validate_run_config

GOOD = {"instruction": "Say hi", "output": "Hi"}


def run_of(tmp_path, rows=None, **sections):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (rows or [GOOD, GOOD])))
    config = {"output_dir": str(tmp_path / "out"), "data": {"dataset": str(data)}}
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return validate_run_config(config)


def test_a_good_run_passes_without_warnings(tmp_path):
    assert check_run(run_of(tmp_path)) == []


def test_a_bad_row_after_the_first_is_refused_with_the_row_report(tmp_path):
    rows = [GOOD, GOOD, {"instruction": "Say hi", "output": ""}, {"instruction": "x"}]
    with pytest.raises(DataError) as error:
        check_run(run_of(tmp_path, rows))
    text = str(error.value)
    assert "d.jsonl: 2 of 4 rows cannot be used" in text
    assert "d.jsonl line 3: field `output` is empty" in text
    assert "d.jsonl line 4: field `output` is missing" in text
    assert text.startswith("data.dataset = ") and "data.bad_rows=skip" in text
    # skipping is the user's choice: within the share it passes, beyond it not
    with pytest.raises(DataError, match="more than data.max_skipped_share=0.1"):
        check_run(run_of(tmp_path, rows, data={"bad_rows": "skip"}))
    skip = {"bad_rows": "skip", "max_skipped_share": 0.5}
    assert check_run(run_of(tmp_path, rows, data=skip)) == []


def test_an_output_dir_holding_a_model_or_a_run_is_refused(tmp_path):
    run = run_of(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="it is a model folder"):
        check_run(run)


def test_a_missing_model_folder_is_refused(tmp_path):
    run = run_of(tmp_path, model={"name_or_path": str(tmp_path / "no-model")})
    with pytest.raises(ModelError, match="no-model does not exist"):
        check_run(run)


def test_settings_that_cannot_take_effect(tmp_path):
    with pytest.raises(ConfigError, match="eval.exact_match is set but the run has no eval data"):
        check_run(run_of(tmp_path, eval={"exact_match": True}))
    warnings = check_run(run_of(tmp_path, train={"eval_every": 5}, eval={"limit": 3}))
    assert warnings == [
        "train.eval_every, eval.limit change nothing: the run has no eval data (eval.dataset "
        "or eval.datasets names some; a file data.dataset has none by default)"
    ]
    # eval prompts are sampled without eval data, so eval_every then decides when
    assert check_run(run_of(tmp_path, train={"eval_every": 5, "eval_prompts": ["hi"]})) == []
    assert check_run(run_of(tmp_path, data={"max_skipped_share": 0.3})) == [
        "data.max_skipped_share changes nothing unless data.bad_rows is skip"
    ]
    assert check_run(run_of(tmp_path, data={"mix_seed": 3})) == [
        "data.mix_seed changes nothing without data.datasets"
    ]


def test_a_mix_is_evaluated_on_its_builtin_test_splits(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(GOOD) + "\n")
    run = validate_run_config(
        {"data": {"datasets": [{"path": str(data)}, {"path": "general", "weight": 2}]}}
    )
    held_out = run.eval_data_config()
    assert [(s.path, s.split, s.weight) for s in held_out.datasets] == [("general", "test", None)]
    assert check_run(run.model_copy(update={"output_dir": str(tmp_path / "o")})) == []
