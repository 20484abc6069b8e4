"""`lorakit sweep` (lorakit.jobs.sweep): variants of a base config on a tiny model, the report,
resuming, failures recorded, bad variants refused before anything runs (the report's reading of
the numbers: test_sweep_report.py)."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from lorakit import LoraConfig, get_peft_model
from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.jobs.sweep import plan_sweep, run_sweep
from lorakit.models import load_model
from tiny_folders import save_tiny

RANKS = [1, 2, 4]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


def write_sweep(folder, model_dir, **sweep) -> str:
    base = {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"dataset": "arithmetic", "limit": 8, "max_length": 64},
        "eval": {"limit": 2, "exact_match": True, "max_new_tokens": 2},
        "train": {
            "max_steps": 2,
            "batch_size": 4,
            "lr": 1e-2,
            "precision": "fp32",
            "progress": "none",
            "tensorboard": False,
            "plots": False,
            "eval_every": 1,
        },
    }
    (folder / "base.yaml").write_text(yaml.safe_dump(base))
    data = {
        "base": "base.yaml",
        "output_dir": str(folder / "out"),
        "zip": {"lora.r": RANKS, "lora.lora_alpha": [2 * r for r in RANKS]},
        "prompts": ["What is 2 + 3?"],
        "max_new_tokens": 2,
        **sweep,
    }
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def test_three_variants_give_one_report_row_each_with_peft_counts(tiny_dir, tmp_path, capsys):
    path = write_sweep(tmp_path, tiny_dir)
    assert main(["sweep", path]) == 0
    out = tmp_path / "out"
    text = capsys.readouterr().out
    assert "[1/3] r=1" in text and "[3/3] r=4" in text
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["name"] for r in rows] == ["r=1", "r=2", "r=4"]
    assert all(r["status"] == "finished" for r in rows)
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for r, record in zip(RANKS, records, strict=True):
        # the same config on a fresh base: get_nb_trainable_parameters is the reference
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"])
        trainable, total = get_peft_model(
            load_model(str(tiny_dir)), config
        ).get_nb_trainable_parameters()
        assert (record["trainable_params"], record["total_params"]) == (trainable, total)
        assert record["steps"] == 2 and [s for s, _ in record["curve"]["eval"]] == [0, 1, 2]
        assert 0.0 <= record["exact_match"] <= 1.0 and record["answers"][0]["prompt"]
        assert record["adapter_bytes"] > 0 and record["final_eval_loss"] > 0
        assert (out / record["name"] / "final" / "adapter_model.safetensors").is_file()
    ranks = [rec["trainable_params"] for rec in records]
    assert ranks[0] * 2 == ranks[1] and ranks[1] * 2 == ranks[2]  # linear in r
    report = (out / "report.md").read_text()
    assert "| r=2 | finished |" in report and "base model (no training)" in report
    assert "## Best variant per metric" in report and "lowest eval loss" in report
    for figure in ("score_vs_r", "params_vs_score", "time_memory", "curves", "gap"):
        assert (out / "figures" / f"{figure}.png").stat().st_size > 1000
        assert f"figures/{figure}.png" in report


def test_bad_variant_key_is_refused_before_anything_runs(tiny_dir, tmp_path):
    path = write_sweep(tmp_path, tiny_dir, variants={"ok": {}, "typo": {"lora.rr": 3}})
    with pytest.raises(ConfigError, match=r"variant `r=1\+typo`.*unknown key `lora.rr`"):
        plan_sweep(path)
    assert not (tmp_path / "out").exists()


def test_empty_zip_lists_and_unequal_lengths_are_refused(tiny_dir, tmp_path):
    path = write_sweep(tmp_path, tiny_dir, zip={"lora.r": [1, 2], "lora.lora_alpha": [2]})
    with pytest.raises(ConfigError, match="one equal, non-zero length"):
        plan_sweep(path)


def test_a_failing_variant_is_recorded_and_the_rest_run(tiny_dir, tmp_path):
    variants = {"fine": {}, "broken": {"lora.target_modules": ["no_such_layer"]}}
    path = write_sweep(tmp_path, tiny_dir, zip={}, grid={"lora.r": [2]}, variants=variants)
    result = run_sweep(plan_sweep(path), show=lambda _: None)
    status = {r["name"]: r["status"] for r in result.records}
    assert status == {"r=2+fine": "finished", "r=2+broken": "failed"}
    broken = json.loads((tmp_path / "out" / "r=2+broken" / "error.json").read_text())
    assert "no_such_layer" in broken["error"]
    assert "r=2+broken" in (tmp_path / "out" / "report.md").read_text().split("## Failed")[1]


def test_interrupted_sweep_resumes_and_skips_finished_variants(tiny_dir, tmp_path, monkeypatch):
    path = write_sweep(tmp_path, tiny_dir)
    from lorakit.jobs import finetune

    real, calls = finetune.run_training, []

    def interrupt_second(run, **kwargs):
        calls.append((run.output_dir, kwargs["resume"]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(run, **kwargs)

    monkeypatch.setattr(finetune, "run_training", interrupt_second)
    first = run_sweep(plan_sweep(path), show=lambda _: None)
    assert first.interrupted
    assert [r["status"] for r in first.records] == ["finished", "not run", "not run"]

    with pytest.raises(ConfigError, match="--resume"):  # the folder is not silently reused
        run_sweep(plan_sweep(path), show=lambda _: None)

    lines = []
    again = run_sweep(plan_sweep(path), resume=True, show=lines.append)
    assert not again.interrupted
    assert "[1/3] r=1: finished earlier, skipped" in lines
    assert [r["status"] for r in again.records] == ["finished"] * 3
    assert [c[0].rsplit("/", 1)[-1] for c in calls[2:]] == ["r=2", "r=4"]


def test_an_interrupted_variant_resumes_from_its_checkpoint(tiny_dir, tmp_path, monkeypatch):
    import signal

    from lorakit.jobs import finetune
    from lorakit.train import loop

    path = write_sweep(tmp_path, tiny_dir, zip={}, grid={"lora.r": [2]})
    plan = plan_sweep(path)
    real_seed, real_run, seen = loop.step_seed, finetune.run_training, []

    def ctrl_c_in_step_one(seed, step, rank):  # Ctrl-C while step 1 runs
        if step == 0:
            signal.raise_signal(signal.SIGINT)
        return real_seed(seed, step, rank)

    def spy(run, **kwargs):
        seen.append(kwargs["resume"])
        return real_run(run, **kwargs)

    monkeypatch.setattr(finetune, "run_training", spy)
    monkeypatch.setattr(loop, "step_seed", ctrl_c_in_step_one)
    first = run_sweep(plan, show=lambda _: None)
    assert first.interrupted and first.records[0]["status"] == "not run"
    assert (plan.variants[0].folder / "checkpoints" / "step-00000001").is_dir()
    monkeypatch.setattr(loop, "step_seed", real_seed)
    again = run_sweep(plan, resume=True, show=lambda _: None)
    assert seen == [None, "auto"]
    assert again.records[0]["status"] == "finished" and again.records[0]["steps"] == 2


def test_a_failed_variant_is_retried_afresh_on_resume(tiny_dir, tmp_path, monkeypatch):
    from lorakit.jobs import finetune

    path = write_sweep(tmp_path, tiny_dir, zip={}, grid={"lora.r": [2]})
    real, calls = finetune.run_training, []

    def fail_once(run, **kwargs):
        calls.append(kwargs["resume"])
        if len(calls) == 1:
            (tmp_path / "out" / "r=2").mkdir(parents=True)
            (tmp_path / "out" / "r=2" / "metrics.jsonl").write_text("")  # a run's leftovers
            raise RuntimeError("out of memory")
        return real(run, **kwargs)

    monkeypatch.setattr(finetune, "run_training", fail_once)
    first = run_sweep(plan_sweep(path), show=lambda _: None)
    assert first.records[0]["status"] == "failed" and "out of memory" in first.records[0]["error"]
    again = run_sweep(plan_sweep(path), resume=True, show=lambda _: None)
    assert again.records[0]["status"] == "finished" and calls == [None, None]


def test_only_runs_the_named_variants(tiny_dir, tmp_path):
    path = write_sweep(tmp_path, tiny_dir)
    result = run_sweep(plan_sweep(path), only=["r=2"], show=lambda _: None)
    assert [r["status"] for r in result.records] == ["not run", "finished", "not run"]
    with pytest.raises(ConfigError, match="no variant named"):
        run_sweep(plan_sweep(path), resume=True, only=["r=3"], show=lambda _: None)
