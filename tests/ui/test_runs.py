"""The runs folder as `lorakit ui` reads it (jobs/runs.py) and the page's JSON routes
(jobs/ui.py): statuses, sweeps, metrics since a row, path containment, the API key."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lorakit.errors import ConfigError
from lorakit.ui.runs import list_runs, metrics_since, resolve_run, run_details
from lorakit.jobs.sweep import DONE, FAILED, PLAN
from lorakit.train.rundir import write_status

KEY = "sk-ui-test"


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
    root = tmp_path / "runs"
    host = socket.gethostname()
    done = write_run(
        root / "done", [3.0, 2.5, 2.0, 1.5], {"status": "finished", "step": 4, "total_steps": 4},
        **{"config.json": json.dumps({"lora": {"r": 8}}),
           "samples.jsonl": json.dumps({"step": 4, "prompt": "hi", "completion": "hello"}) + "\n"},
    )  # fmt: skip
    (done / "final").mkdir()
    running = {"status": "running", "host": host, "pid": os.getpid(), "total_steps": 10}
    write_run(root / "group" / "live", [3.0, 2.9], running)
    write_run(root / "killed", [3.0], {"status": "running", "host": host, "pid": dead_pid()})
    old = write_run(root / "old", [3.0, 2.0], None)
    (old / "checkpoints").mkdir()
    sweep = root / "ranks"
    sweep.mkdir()
    plan = {"axes": ["lora.r"], "variants": [{"name": n, "overrides": {"lora.r": r}}
            for n, r in (("r=4", 4), ("r=8", 8), ("r=16", 16))]}  # fmt: skip
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
        4, 1.5, 2.0, 2.0  # eval rows at steps 2 and 4: 2.5 + 0.5 and 1.5 + 0.5
    )  # fmt: skip


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
        "running", os.getpid(), socket.gethostname()
    )  # fmt: skip


# ---------------------------------------------------------------- the JSON routes


@pytest.fixture
def client(runs_root):
    from starlette.testclient import TestClient

    from lorakit.ui.routes import OPEN_PATHS, page_routes
    from lorakit.serve.app import create_app

    app = create_app(None, api_key=KEY, extend=page_routes(runs_root), open_paths=OPEN_PATHS)
    with TestClient(app) as client:
        yield client


def test_page_files_are_open_and_data_needs_the_key(client):
    page = client.get("/ui/")
    assert page.status_code == 200 and "<canvas" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/ui/ui.js").headers["content-type"].startswith("text/javascript")
    for path in ("/ui/api/info", "/ui/api/runs", "/ui/api/run?path=done", "/v1/models"):
        answer = client.get(path)
        assert answer.status_code == 401, path
        assert "API key" in answer.json()["error"]["message"]
    assert client.get("/ui/secret.py").status_code == 401  # not a page file: behind the key
    auth = {"Authorization": f"Bearer {KEY}"}
    assert client.get("/ui/secret.py", headers=auth).status_code == 404  # only the page's files


def test_routes_answer_with_the_key(client):
    auth = {"Authorization": f"Bearer {KEY}"}
    info = client.get("/ui/api/info", headers=auth).json()
    assert (info["runs"], info["model"]) == (True, None)
    paths = [e["path"] for e in client.get("/ui/api/runs", headers=auth).json()["runs"]]
    assert sorted(paths) == ["done", "group/live", "killed", "old", "ranks"]
    rows = client.get("/ui/api/metrics?path=done&after=3", headers=auth).json()["rows"]
    assert [r["step"] for r in rows] == [3, 4, 4]  # rows 4-6 of t1 t2 e2 t3 t4 e4
    escape = client.get("/ui/api/run?path=../outside", headers=auth)
    assert escape.status_code == 400 and "not allowed" in escape.json()["error"]["message"]
    bad = client.get("/ui/api/metrics?path=done&after=-1", headers=auth)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "after"
    missing = client.get("/ui/api/run", headers=auth)
    assert missing.status_code == 400 and "`path` is missing" in missing.json()["error"]["message"]
    no_model = client.post("/v1/chat/completions", headers=auth, json={})
    assert no_model.status_code == 404 and "--model" in no_model.json()["error"]["message"]


def test_the_page_fetches_nothing_from_elsewhere():
    """Offline machines: no URL of another host in the page's files, and every file listed."""
    import re

    from lorakit.ui.routes import PAGE, PAGE_FILES

    assert sorted(PAGE_FILES) == sorted(p.name for p in PAGE.iterdir())
    for name in PAGE_FILES:
        text = (PAGE / name).read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), name
        assert not re.search(r"\b(import|@import)\s*\(?\s*['\"]https?", text), name
