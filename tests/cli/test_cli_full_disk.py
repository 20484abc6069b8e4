"""A disk that fills up at any write of `lorakit train`: the run stops with one clear error,
`--resume auto` (once there is room again) ends at the very adapter an undisturbed run gives,
and no temporary file survives.

Every write of a run (`full_disk.FullDisk`), the plots' included, is tried in turn: slow.
tests/train/test_rundir.py tries every write of `train()` in the default suite.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_cli_runs import write_config

from full_disk import FullDisk, temporaries
from lorakit.cli import main
from tiny_folders import save_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


def run_train(config: str, monkeypatch, at: int | None, *extra: str) -> tuple[int, int]:
    """`lorakit train CONFIG EXTRA` with the disk full from write `at`; (exit code, writes)."""
    disk = FullDisk(at)
    with monkeypatch.context() as patch:
        disk.install(patch)
        code = main(["train", config, *extra])
    return code, disk.writes


def train_steps(out: Path) -> list[int]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row["step"] for row in rows if row["kind"] == "train"]


@pytest.mark.slow
def test_a_full_disk_at_any_write_then_resume_auto_ends_as_an_undisturbed_run(
    tiny_dir, tmp_path, monkeypatch, capsys
):
    settings = {"max_steps": 2, "save_every": 1, "seed": 3, "plots": True}
    clean = tmp_path / "clean"
    clean.mkdir()
    code, writes = run_train(
        write_config(clean, tiny_dir, clean / "run", **settings), monkeypatch, None
    )
    assert code == 0 and writes > 10
    want = load_file(str(clean / "run" / "final" / "adapter_model.safetensors"))
    capsys.readouterr()
    failures = []
    for at in range(1, writes + 1):
        folder = tmp_path / f"full-at-{at}"
        folder.mkdir()
        config = write_config(folder, tiny_dir, folder / "run", **settings)
        code, made = run_train(config, monkeypatch, at)
        err = capsys.readouterr().err
        if made < at:  # fewer writes than the first run (caches written once, e.g. fonts)
            continue
        if code != 1 or "No space left on device" not in err or "Traceback" in err:
            failures.append(f"write {at}: exit {code}: {err.strip()[-300:]}")
            continue
        code, _ = run_train(config, monkeypatch, None, "--resume", "auto")
        err = capsys.readouterr().err
        out = folder / "run"
        if code != 0:
            failures.append(f"write {at}, resume: exit {code}: {err.strip()[-300:]}")
            continue
        got = load_file(str(out / "final" / "adapter_model.safetensors"))
        if got.keys() != want.keys() or any((got[k] != want[k]).any() for k in want):
            failures.append(f"write {at}: the resumed adapter differs")
        if train_steps(out) != [1, 2]:
            failures.append(f"write {at}: metrics.jsonl steps {train_steps(out)}")
        if temporaries(folder):
            failures.append(f"write {at}: left {temporaries(folder)}")
    assert failures == [], "\n".join(failures)
