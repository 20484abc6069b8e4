"""The runs folder as `lorakit ui` reads it (ui/runs.py): statuses, sweeps, metrics since a row,
path containment."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lorakit.errors import ConfigError
from lorakit.jobs.sweep import DONE, FAILED, PLAN
from lorakit.train.rundir import write_status
from lorakit.ui.runs import list_runs, metrics_since, resolve_run, run_details


def write_run(folder: Path, losses: list[float], status: dict | None, **files) -> Path:
    """A run folder: metrics.jsonl (train rows, an eval row every 2 steps), status.json."""
    folder.mkdir(parents=True)
    rows = []
    for step, loss in enumerate(losses, start=1):
        rows.append({"step": step, "kind": "train", "loss": loss, "lr": 0.001 * step})
        if step % 2 == 0:
            rows.append({"step": step, "kind": "eval", "eval_loss": loss + 0.5, "perplexity": 9})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if status is not None:
        (folder / "status.json").write_text(json.dumps(status))
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture
def runs_root(tmp_path):
    return example_runs(tmp_path)


def example_runs(tmp_path: Path) -> Path:
    """tmp_path/runs: finished, live, killed and old runs, a sweep, a symlink out, a hidden run."""
    root = tmp_path / "runs"
    host = socket.gethostname()
    done = write_run(
        root / "done",
        [3.0, 2.5, 2.0, 1.5],
        {"status": "finished", "step": 4, "total_steps": 4},
        **{
            "config.json": json.dumps({"lora": {"r": 8}}),
            "samples.jsonl": json.dumps({"step": 4, "prompt": "hi", "completion": "hello"}) + "\n",
        },
    )
    (done / "final").mkdir()
    running = {"status": "running", "host": host, "pid": os.getpid(), "total_steps": 10}
    write_run(root / "group" / "live", [3.0, 2.9], running)
    write_run(root / "killed", [3.0], {"status": "running", "host": host, "pid": dead_pid()})
    old = write_run(root / "old", [3.0, 2.0], None)
    (old / "checkpoints").mkdir()
    sweep = root / "ranks"
    sweep.mkdir()
    plan = {
        "axes": ["lora.r"],
        "variants": [
            {"name": n, "overrides": {"lora.r": r}}
            for n, r in (("r=4", 4), ("r=8", 8), ("r=16", 16))
        ],
    }
    (sweep / PLAN).write_text(json.dumps(plan))
    write_run(sweep / "r=4", [2.0, 1.0], {"status": "finished"})
    (sweep / "r=4" / DONE).write_text(json.dumps({"status": "finished"}))
    (sweep / "r=8").mkdir()  # failed before training wrote anything
    (sweep / "r=8" / FAILED).write_text(json.dumps({"status": "failed", "error": "OOM"}))
    outside = write_run(tmp_path / "outside", [1.0], {"status": "finished"})
    os.symlink(outside, root / "link")
    write_run(root / ".hidden", [1.0], {"status": "finished"})
    return root


def test_runs_are_listed_with_their_status(runs_root):
    entries = {e["path"]: e for e in list_runs(runs_root)}
    assert set(entries) == {"done", "group/live", "killed", "old", "ranks"}  # no link, .hidden
    assert entries["done"]["status"] == "finished"
    assert entries["group/live"]["status"] == "running"  # its pid (this test) is alive
    assert entries["killed"]["status"] == "failed"
    assert "gone without recording" in entries["killed"]["error"]
    assert entries["old"]["status"] == "interrupted"  # no status.json: checkpoints, no final/
    done = entries["done"]
    assert (done["step"], done["loss"], done["eval_loss"], done["best_eval_loss"]) == (
        4,
        1.5,
        2.0,
        2.0,  # eval rows at steps 2 and 4: 2.5 + 0.5 and 1.5 + 0.5
    )


def test_a_sweep_shows_its_variants_in_plan_order(runs_root):
    sweep = next(e for e in list_runs(runs_root) if e["kind"] == "sweep")
    assert [(v["name"], v["status"], v["path"]) for v in sweep["variants"]] == [
        ("r=4", "finished", "ranks/r=4"),
        ("r=8", "failed", None),  # recorded by the sweep; no run folder to open
        ("r=16", "not run", None),
    ]
    assert sweep["variants"][1]["error"] == "OOM"
    assert sweep["variants"][0]["overrides"] == {"lora.r": 4}
    assert sweep["status"] == "failed"


def test_run_details_hold_config_samples_and_saved_folders(runs_root):
    run = run_details(runs_root, "done")
    assert run["config"] == {"lora": {"r": 8}}
    assert run["samples"] == [{"step": 4, "prompt": "hi", "completion": "hello"}]
    assert run["saved"] == {"final": {"folder": "done/final", "eval": None}}


def test_metrics_since_a_row_and_after_a_rewrite(runs_root):
    first = metrics_since(runs_root, "group/live", 0)
    assert (first["count"], first["reset"], first["status"]) == (3, False, "running")
    path = runs_root / "group" / "live" / "metrics.jsonl"
    with path.open("a") as f:
        f.write(json.dumps({"step": 3, "kind": "train", "loss": 2.8, "lr": 0.003}) + "\n")
    later = metrics_since(runs_root, "group/live", first["count"])
    assert later["rows"] == [{"step": 3, "kind": "train", "loss": 2.8, "lr": 0.003}]
    path.write_text(json.dumps({"step": 1, "kind": "train", "loss": 3.0, "lr": 0.001}) + "\n")
    rewritten = metrics_since(runs_root, "group/live", 4)  # a resume cut the file back
    assert (rewritten["reset"], rewritten["count"], len(rewritten["rows"])) == (True, 1, 1)


@pytest.mark.parametrize(
    "path", ["../outside", "/etc", "done/../killed", "link", "done\\x", "", "./done", "done/final"]
)
def test_paths_outside_the_runs_or_not_runs_are_refused(runs_root, path):
    with pytest.raises((ConfigError, FileNotFoundError)):
        resolve_run(runs_root, path)


def test_write_status_running_records_host_and_pid(tmp_path):
    write_status(tmp_path, "running", step=0)
    record = json.loads((tmp_path / "status.json").read_text())
    assert (record["status"], record["pid"], record["host"]) == (
        "running",
        os.getpid(),
        socket.gethostname(),
    )
