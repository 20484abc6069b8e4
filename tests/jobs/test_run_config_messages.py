"""The messages a newcomer meets first: a typo in an override is blamed on the override, YAML
errors name the file, and data references are checked (in `lorakit validate` and before any
model loads) with the key, the value and the fix."""

from __future__ import annotations

import json

import pytest

from lorakit.cli import main
from lorakit.errors import ConfigError, DataError
from lorakit.jobs.run_config import check_data, load_run_config, validate_run_config


def write(tmp_path, text: str, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_typo_in_an_override_is_blamed_on_the_override(tmp_path):
    path = write(tmp_path, "lora:\n  r: 8\n")
    with pytest.raises(ConfigError) as caught:
        load_run_config(path, ["lora.rnak=3"])
    message = str(caught.value)
    assert message.startswith("override `lora.rnak=3`: unknown key `lora.rnak`")
    assert str(path) not in message


def test_file_and_override_errors_each_name_their_source(tmp_path):
    path = write(tmp_path, "lora:\n  rnak: 8\n")
    with pytest.raises(ConfigError) as caught:
        load_run_config(path, ["train.lr=abc"])
    file_part, override_part = str(caught.value).split("; override ")
    assert file_part.startswith(f"{path}: unknown key `lora.rnak`")
    assert override_part.startswith("`train.lr=abc`: `train.lr` = 'abc' is invalid")
    # a nested dict with no overrides: everything is the source's
    with pytest.raises(ConfigError, match=r"^cfg: unknown key `lora\.rnak`"):
        validate_run_config({"lora": {"rnak": 8}}, "cfg")


def test_yaml_errors_name_the_file_not_a_unicode_string(tmp_path):
    path = write(tmp_path, "data:\n  dataset: [a\n")
    with pytest.raises(ConfigError) as caught:
        load_run_config(path)
    assert f'in "{path}", line 2' in str(caught.value)
    assert "<unicode string>" not in str(caught.value)


def test_validate_rejects_a_missing_dataset_file(tmp_path, capsys):
    path = write(tmp_path, f"data:\n  dataset: {tmp_path / 'nothere.jsonl'}\n")
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"data.dataset = '{tmp_path / 'nothere.jsonl'}'" in err and "does not exist" in err
    assert not err.rstrip().endswith(": valid")


def test_validate_rejects_a_misspelled_builtin_dataset(tmp_path, capsys):
    assert main(["validate", str(write(tmp_path, "data:\n  dataset: identiy\n"))]) == 1
    err = capsys.readouterr().err
    assert "data.dataset = 'identiy'" in err and "(did you mean `identity`?)" in err


def test_the_eval_dataset_and_split_are_checked_too(tmp_path):
    run = load_run_config(write(tmp_path, "eval:\n  dataset: identity\n  split: tset\n"))
    with pytest.raises(DataError, match=r"eval\.dataset = 'identity' \(split 'tset'\).*not `tset`"):
        check_data(run)


def test_a_file_of_another_format_is_named_as_such(tmp_path):
    csv = write(tmp_path, "a,b\n1,2\n", "rows.jsonl")
    run = load_run_config(write(tmp_path, f"data:\n  dataset: {csv}\n"))
    with pytest.raises(DataError, match=r"no row is an object.*really is \.jsonl"):
        check_data(run)
    rows = write(tmp_path, json.dumps({"question": "q", "answer": "a"}) + "\n", "qa.jsonl")
    run = load_run_config(write(tmp_path, f"data:\n  dataset: {rows}\n"))
    with pytest.raises(DataError, match=r"cannot tell the dataset format.*data\.columns"):
        check_data(run)


def test_a_text_file_gets_a_pointer(tmp_path):
    txt = write(tmp_path, "one\n%\ntwo\n", "quotes.txt")
    run = load_run_config(write(tmp_path, f"data:\n  dataset: {txt}\n"))
    with pytest.raises(DataError, match=r"\.txt file into `text` rows.*docs/data-formats\.md"):
        check_data(run)


def test_train_checks_data_before_loading_the_model(tmp_path, monkeypatch, capsys):
    import lorakit.models

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(lorakit.models, "load_model_and_tokenizer", no_model)
    path = write(tmp_path, f"output_dir: {tmp_path / 'run'}\ndata:\n  dataset: identiy\n")
    assert main(["train", str(path)]) == 1
    assert "data.dataset = 'identiy'" in capsys.readouterr().err


def test_invalid_json_names_the_position_once(tmp_path):
    from lorakit.data.formats import read_rows

    rows = read_rows(write(tmp_path, '{"text": "a}', "cut.jsonl"))  # cut off: no newline
    assert str(rows[0].value) == "invalid JSON (Unterminated string starting at column 10)"
    with pytest.raises(DataError) as caught:
        read_rows(write(tmp_path, '[{"text": "a}]', "cut.json"))
    assert "(Unterminated string starting at line 1, column 11)" in str(caught.value)
    assert "at at" not in str(caught.value)


def test_a_whole_file_of_the_wrong_format_is_not_told_to_skip_rows(tmp_path):
    from lorakit.data.pipeline import DataConfig, build_dataset
    from lorakit.models import load_tokenizer
    from tiny_folders import save_tiny

    rows = write(tmp_path, "".join(json.dumps({"text": 3}) + "\n" for _ in range(4)), "n.jsonl")
    tokenizer = load_tokenizer(str(save_tiny(tmp_path / "tiny")))
    with pytest.raises(DataError) as caught:
        build_dataset(DataConfig(dataset=str(rows)), tokenizer)
    message = str(caught.value)
    assert "none of its 4 rows can be used" in message and "data.format" in message
    assert "bad_rows=skip" not in message


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (["model.quantization=nf4"], "model.quantization='nf4'"),
        (["method=full"], "method=full"),
        (["eval.exact_match=true"], "eval.exact_match"),
        (["train.precision=fp16"], "precision='fp16'"),
    ],
)
def test_fsdp_refusals_are_found_before_any_model_loads(tmp_path, overrides, names):
    path = write(tmp_path, "train:\n  distributed: fsdp\n")
    with pytest.raises(ConfigError) as caught:
        load_run_config(path, overrides)
    message = str(caught.value)
    assert names in message and "not supported by lorakit" in message
    assert "train.distributed=ddp" in message  # the fix
    assert load_run_config(path).train.distributed == "fsdp"  # fsdp itself is fine
