"""The runs folder as the web page shows it: run folders and sweep folders, each run's status,
config, metrics, samples and final numbers. Read only; no path leaves the root.

A folder is a run when it holds metrics.jsonl or status.json (what `lorakit train` writes) and
a sweep when it holds sweep.json (`lorakit sweep`); a sweep's variants are its subfolders, in
the plan's order. Folders are searched at most MAX_DEPTH levels below the root; hidden
folders, symlinks and a run's own subfolders (checkpoints, final, ...) are not entered.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError
from lorakit.jobs.sweep import DONE, FAILED, PLAN
from lorakit.train.log import read_metrics
from lorakit.train.rundir import RUN_FILES, STATUS, read_status

MAX_DEPTH = 4
MAX_SAMPLES = 50  # newest samples returned with a run
_MAX_TEXT = 256 * 1024  # config, report and samples files are read up to this size


def resolve_run(root: Path, relative: str) -> Path:
    """The run or sweep folder `relative` names under `root`; ConfigError for anything else.

    Refused: absolute paths, '..', backslashes, control characters, symlinks on the way, and
    folders that are neither runs nor sweeps.
    """
    parts = relative.split("/") if relative else []
    if (
        not parts
        or len(relative) > 1024
        or relative.startswith("/")
        or "\\" in relative
        or any(ord(ch) < 32 for ch in relative)
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise ConfigError(
            f"run path {relative!r} is not allowed: give a folder of the runs list, relative to "
            "--runs (no '..', absolute paths or backslashes)"
        )
    path = Path(root)
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise ConfigError(f"run path {relative!r}: {part} is a symlink; it is not followed")
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise ConfigError(f"run path {relative!r} leaves the runs folder")
    if not (_is_run(path) or _is_sweep(path)):
        raise FileNotFoundError(f"no run or sweep folder {relative!r} under the runs folder")
    return path


def list_runs(root: Path) -> list[dict[str, Any]]:
    """Every run and sweep under `root`, newest first, each with its summary."""
    found: list[dict[str, Any]] = []
    _walk(Path(root), Path(root), 0, found)
    found.sort(key=lambda entry: entry["modified"], reverse=True)
    return found


def _walk(root: Path, folder: Path, depth: int, found: list[dict[str, Any]]) -> None:
    try:
        children = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return
    for child in children:
        if child.name.startswith(".") or child.is_symlink() or not child.is_dir():
            continue
        path = Path(child.path)
        if _is_sweep(path):
            found.append(sweep_summary(root, path))
        elif _is_run(path):
            found.append(run_summary(root, path))
        elif depth + 1 < MAX_DEPTH:
            _walk(root, path, depth + 1, found)


def _is_run(path: Path) -> bool:
    return (path / "metrics.jsonl").is_file() or (path / STATUS).is_file()


def _is_sweep(path: Path) -> bool:
    return (path / PLAN).is_file()


def _relative(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _modified(path: Path) -> float:
    times = [(path / name).stat().st_mtime for name in RUN_FILES if (path / name).exists()]
    return max(times, default=path.stat().st_mtime)


def run_summary(root: Path, path: Path) -> dict[str, Any]:
    """Name, status, progress and the latest numbers of one run folder."""
    rows = read_metrics(path / "metrics.jsonl")
    status = read_status(path)
    train_rows = [r for r in rows if r.get("kind", "train") == "train"]
    eval_rows = [r for r in rows if r.get("kind") == "eval"]
    evals = [r["eval_loss"] for r in eval_rows if isinstance(r.get("eval_loss"), int | float)]
    return {
        "kind": "run",
        "path": _relative(root, path),
        "name": path.name,
        "status": status["status"],
        "error": status.get("error"),
        "step": max((r.get("step", 0) for r in rows), default=0),
        "total_steps": status.get("total_steps"),
        "loss": train_rows[-1].get("loss") if train_rows else None,
        "eval_loss": evals[-1] if evals else None,
        "best_eval_loss": min(evals) if evals else None,
        "modified": _modified(path),
    }


def sweep_summary(root: Path, path: Path) -> dict[str, Any]:
    """A sweep folder: its axes and variants (each a run summary with its overrides)."""
    plan = _read_json(path / PLAN) or {}
    variants = []
    for entry in plan.get("variants", []):
        name = str(entry.get("name", ""))
        folder = path / name
        if not name or "/" in name or name.startswith(".") or not folder.is_dir():
            variants.append({"name": name, "status": "not run", "path": None})
            continue
        summary = run_summary(root, folder) if _is_run(folder) else {"status": "not run"}
        record = _read_json(folder / FAILED) or _read_json(folder / DONE) or {}
        if record.get("status") == "failed":  # the sweep's record knows errors before training
            summary.update(status="failed", error=record.get("error"))
        summary.update(name=name, path=_relative(root, folder) if _is_run(folder) else None)
        variants.append({**summary, "overrides": entry.get("overrides", {})})
    states = {v["status"] for v in variants}
    status = next((s for s in ("running", "failed", "interrupted") if s in states), "finished")
    if states & {"not run", "unknown"} and status == "finished":
        status = "unknown"  # fewer finished variants than the plan has, none running
    return {
        "kind": "sweep",
        "path": _relative(root, path),
        "name": path.name,
        "status": status,
        "axes": plan.get("axes", []),
        "variants": variants,
        "modified": max([_modified(path)] + [v.get("modified", 0) for v in variants]),
    }


def run_details(root: Path, relative: str) -> dict[str, Any]:
    """A run's summary with its config, its final numbers and its newest samples; a sweep's
    summary with its report."""
    path = resolve_run(root, relative)
    if _is_sweep(path):
        return {**sweep_summary(root, path), "report": _read_text(path / "report.md")}
    samples = _read_jsonl(path / "samples.jsonl")[-MAX_SAMPLES:]
    config = _read_json(path / "config.json")
    final = {}
    for name in ("final", "best"):
        if (path / name).is_dir():
            final[name] = {
                "folder": f"{relative}/{name}",
                "eval": _read_json(path / name / "eval.json"),
            }
    return {**run_summary(root, path), "config": config, "samples": samples, "saved": final}


def metrics_since(root: Path, relative: str, after: int) -> dict[str, Any]:
    """The metric rows after the first `after` ones; all of them with `reset` when the file
    has fewer rows than that (a resumed run rewrote it)."""
    if after < 0:
        raise ConfigError(f"after={after}: expected a row count >= 0")
    path = resolve_run(root, relative)
    rows = read_metrics(path / "metrics.jsonl")
    reset = after > len(rows)
    new = rows if reset else rows[after:]
    return {"rows": new, "count": len(rows), "reset": reset, "status": read_status(path)["status"]}


def _read_json(path: Path) -> Any:
    text = _read_text(path)
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in (_read_text(path, tail=True) or "").splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut off (or cut by the tail)
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _read_text(path: Path, tail: bool = False) -> str | None:
    """A file's text, at most _MAX_TEXT bytes of it (its end when `tail`); None if absent."""
    try:
        with open(path, "rb") as f:
            if tail:
                f.seek(max(0, os.fstat(f.fileno()).st_size - _MAX_TEXT))
            data = f.read(_MAX_TEXT)
    except OSError:
        return None
    return data.decode("utf-8", errors="replace")
