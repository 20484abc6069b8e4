"""The run config: YAML + overrides, errors that name the key path."""

from __future__ import annotations

import pytest

from lorakit.errors import ConfigError, DataError
from lorakit.jobs.run_config import (
    RunConfig,
    apply_overrides,
    load_run_config,
    validate_run_config,
)


def error_of(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        validate_run_config(data, "run.yaml")
    return str(info.value)


def test_defaults_are_a_valid_run():
    config = validate_run_config({})
    assert config.method == "lora" and config.model.name_or_path == "smollm2-135m-instruct"
    assert config.lora.to_lora_config().r == config.lora.r


def test_typo_names_path_and_closest_key():
    message = error_of({"train": {"learning_rate": 1e-4, "lr": 1e-4}, "lora": {"rank": 8}})
    assert "unknown key `train.learning_rate`" in message
    assert "unknown key `lora.rank`" in message and "did you mean `r`" in message
    assert "run.yaml" in message
    top = error_of({"trian": {}})
    assert "unknown key `trian` (did you mean `train`?)" in top


def test_wrong_type_and_range_say_what_is_allowed():
    message = error_of({"train": {"lr": "fast"}})
    assert "`train.lr` = 'fast'" in message and "float, > 0" in message
    message = error_of({"model": {"dtype": "fp99"}})
    assert "'float32'" in message and "'bfloat16'" in message
    message = error_of({"lora": {"target_modules": 5}})
    assert "`lora.target_modules` = 5" in message and "list[str] | str" in message


def test_quantization_options_name_the_key():
    message = error_of({"model": {"compute_dtype": "bfloat16"}})
    assert "`model.compute_dtype` = 'bfloat16'" in message and "only to a quantized" in message
    message = error_of({"model": {"quantization": "nf4", "compute_dtype": "fp16"}})
    assert "`model.compute_dtype` = 'fp16'" in message and "'bfloat16'" in message
    message = error_of({"model": {"quantization": "nf4", "bnb_4bit_use_double_quant": False}})
    assert "did you mean `double_quant`" in message
    config = validate_run_config(
        {"model": {"quantization": "nf4", "skip": ["lm_head", "down_proj"], "double_quant": False}}
    )
    assert config.model.skip == ["lm_head", "down_proj"] and config.model.double_quant is False


def test_lora_config_errors_surface_with_the_section():
    message = error_of({"lora": {"rank_pattern": {"(": 4}}})
    assert message.startswith("run.yaml: lora:") and "regular expression" in message


def test_lora_variants_from_the_run_config():
    data = apply_overrides(
        {},
        ["lora.use_dora=true", "lora.init_lora_weights=gaussian", "lora.target_modules=[q_proj]"],
    )
    lora = validate_run_config(data).lora.to_lora_config()
    assert lora.use_dora is True and lora.init_lora_weights == "gaussian"
    data = apply_overrides({}, ["lora.init_lora_weights=pissa_niter_2"])
    assert validate_run_config(data).lora.to_lora_config().init_lora_weights == "pissa_niter_2"
    loftq = {"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 8, "loftq_iter": 2}}
    message = error_of({"lora": loftq})  # a run would not save the changed base the adapter needs
    assert message.startswith("run.yaml: lora:") and "not supported by lorakit" in message
    message = error_of({"lora": {"init_lora_weights": "olora", "use_dora": True}})
    assert "use_dora" in message and "not supported by lorakit" in message
    message = error_of({"lora": {"init_lora_weights": "eva"}})
    assert "init_lora_weights='eva'" in message and "not supported by lorakit" in message


def test_overrides_parse_yaml_values_and_nest():
    data = apply_overrides(
        {"train": {"lr": 1.0}},
        [
            "train.lr=1e-4",
            "lora.target_modules=[q_proj, v_proj]",
            "train.max_steps=5",
            "data.template_vars.name=Nova",
            "model.revision=null",
        ],
    )
    config = validate_run_config(data)
    assert config.train.lr == 1e-4 and config.train.max_steps == 5
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.data.template_vars == {"name": "Nova"}
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match="`method` is a value"):
        apply_overrides({"method": "lora"}, ["method.x=1"])


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_run_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_run_config(listed)


def test_eval_data_follows_builtin_train_dataset():
    config = RunConfig()
    assert config.eval_data_config().split == "test"
    custom = validate_run_config({"data": {"dataset": "mine.jsonl"}})
    assert custom.eval_data_config() is None
    explicit = validate_run_config(
        {"data": {"dataset": "mine.jsonl", "packing": True}, "eval": {"dataset": "held.jsonl"}}
    )
    assert explicit.eval_data_config().dataset == "held.jsonl"
    assert explicit.eval_data_config().packing is False


def test_preset_resolves_to_explicit_names(tiny_llama):
    from lorakit import get_peft_model

    model = get_peft_model(tiny_llama, RunConfig().lora.to_lora_config())
    targets = model.peft_config["default"].target_modules
    assert targets[0] == "q_proj" and "down_proj" in targets


def test_a_resume_must_match_every_section_but_train_eval_and_output_dir():
    run = RunConfig()
    settings = run.resume_settings()
    assert set(settings) == {"run.method", "run.model", "run.lora", "run.data", "run.preference"}
    eval_section = run.eval.model_copy(update={"exact_match": True})
    other = run.model_copy(update={"output_dir": "elsewhere", "eval": eval_section})
    assert other.resume_settings() == settings
    lora = run.model_copy(update={"lora": run.lora.model_copy(update={"r": run.lora.r + 1})})
    assert lora.resume_settings()["run.lora"]["r"] == run.lora.r + 1
    # how the tokens are made (processes, the cache) may change; the tokens' settings may not
    made = run.data.model_copy(update={"num_proc": 7, "cache": False})
    assert run.model_copy(update={"data": made}).resume_settings() == settings
    longer = run.data.model_copy(update={"max_length": 64})
    assert run.model_copy(update={"data": longer}).resume_settings() != settings


def test_paths_in_a_config_file_are_relative_to_its_folder(tmp_path, monkeypatch):
    from lorakit.jobs.run_config import load_run_config

    folder = tmp_path / "project" / "configs"
    folder.mkdir(parents=True)
    (folder / "mine.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    config = folder / "run.yaml"
    config.write_text(
        "model: {name_or_path: ../models/tiny}\n"
        "data:\n  datasets: [{path: mine.jsonl}, {path: general}]\n"
        "eval: {dataset: sub/held.jsonl}\n"
        "output_dir: runs/x\n"
    )
    monkeypatch.chdir(tmp_path)  # another working directory
    run = load_run_config(config)
    assert run.data.datasets[0].path == str(folder / "mine.jsonl")
    assert run.data.datasets[1].path == "general"  # a built-in name stays a name
    assert run.eval.dataset == str(folder / "sub" / "held.jsonl")
    assert run.model.name_or_path == str(folder / "../models/tiny")
    assert run.output_dir == "runs/x"  # the working directory's, as before
    # on the command line a path is the shell's: relative to the working directory
    assert load_run_config(config, ["eval.dataset=held.jsonl"]).eval.dataset == "held.jsonl"


def test_a_missing_dataset_file_is_named_with_its_absolute_path(tmp_path, monkeypatch):
    from lorakit.data.formats import read_rows

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=f"dataset file {tmp_path / 'no.jsonl'} does not exist"):
        read_rows("no.jsonl")


def test_a_checkpoint_from_before_data_mixing_resumes_unchanged():
    from lorakit.train.checkpoint import resume_differences

    run = validate_run_config({})
    data = run.model_dump(mode="json")["data"]
    from lorakit.jobs.run_config import DATA_RUN_FREE

    # the data section a checkpoint saved before these keys (and without the free ones)
    before = {"datasets", "mix_seed"} | DATA_RUN_FREE
    saved = dict(run.resume_settings(), **{"run.data": {k: data[k] for k in set(data) - before}})
    now = run.resume_settings()
    assert resume_differences(saved, now) == []
    mixed = validate_run_config({"data": {"datasets": [{"path": "general"}]}}).resume_settings()
    assert resume_differences(now, mixed)[0].startswith("run.data:")
