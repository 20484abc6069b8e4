"""The run directory: leftovers of killed writers, the run's status, what a fresh run refuses,
write failures named. (Atomic replacement itself: tests/test_files.py.)"""

from __future__ import annotations

import errno
import os

import pytest
import torch
from safetensors import SafetensorError

from lorakit import files
from lorakit.errors import ConfigError, DataError
from lorakit.files import TEMPORARY_PREFIX, temporary_name
from lorakit.train.rundir import (
    check_fresh_dir,
    clean_leftovers,
    delete_run,
    earlier_run,
    read_status,
    storage_error,
    write_status,
)

DEAD = 2**30  # above Linux's largest pid: no process has it


def test_leftovers_of_dead_writers_are_cleaned_and_a_lost_folder_restored(tmp_path):
    # names of today's writers, and of older lorakit versions (.tmp-/.old-<name>-<pid>)
    dead_old = temporary_name("last", old=True).replace(str(os.getpid()), str(DEAD), 1)
    dead_new = temporary_name("final").replace(str(os.getpid()), str(DEAD), 1)
    mine = temporary_name("final")
    for name in (
        f".old-best-{DEAD}",
        f".tmp-best-{DEAD}",
        f".tmp-final-{DEAD}",
        "final",
        f".old-final-{DEAD}",
        mine,
        dead_old,
        dead_new,
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "file").write_text(name)
    done = clean_leftovers(tmp_path)
    assert len(done) == 6 and sum(line.startswith("restored") for line in done) == 2
    # the killed writers' old best/ and last/ are back; our own staging folder is left alone
    assert sorted(p.name for p in tmp_path.iterdir()) == [mine, "best", "final", "last"]
    assert (tmp_path / "best" / "file").read_text() == f".old-best-{DEAD}"
    assert (tmp_path / "last" / "file").read_text() == dead_old
    assert (tmp_path / "final" / "file").read_text() == "final"


def test_temporary_files_of_dead_writers_are_removed_too(tmp_path):
    # what a run stopped by a full disk while writing status.json or a JSON file leaves
    live = tmp_path / temporary_name("config.json")
    dead = [f".status.json.{DEAD}", f"{TEMPORARY_PREFIX}{DEAD}-0123abcd-status.json"]
    for name in (*dead, live.name, "notes.txt", ".hidden"):
        (tmp_path / name).write_text("{")
    done = clean_leftovers(tmp_path)
    assert len(done) == 2 and all(line.startswith("removed") for line in done)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "notes.txt", ".hidden"])


def test_an_interrupted_status_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    write_status(tmp_path, "running", step=0)

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "replace", full)
    with pytest.raises(OSError, match="No space"):
        write_status(tmp_path, "finished", step=3)
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]
    assert read_status(tmp_path)["status"] == "running"


@pytest.mark.parametrize("name", ["config.json", "config.yaml", "metrics.jsonl", "final"])
def test_a_fresh_run_refuses_files_it_would_write(tmp_path, name):
    (tmp_path / name).write_text("mine") if "." in name else (tmp_path / name).mkdir()
    (tmp_path / "data.jsonl").write_text("{}")  # other files are no concern
    listed = name + ("" if "." in name else "/")
    with pytest.raises(ConfigError, match=f"already holds {listed}, which a new run would write"):
        check_fresh_dir(tmp_path)
    (tmp_path / name).rename(tmp_path / "moved")
    check_fresh_dir(tmp_path)


def test_a_model_folder_is_named_as_one(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"holds config.json \(it is a model folder\)"):
        check_fresh_dir(tmp_path)


def test_write_failures_become_storage_errors(tmp_path):
    full = SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"
    )  # fmt: skip, what safetensors raises on ENOSPC
    assert "No space left on device. The files being written" in str(storage_error(full, tmp_path))
    read_only = OSError(errno.EROFS, "Read-only file system", str(tmp_path / "config.json"))
    message = str(storage_error(read_only, tmp_path))
    assert message.startswith(f"cannot write {tmp_path / 'config.json'}: Read-only file system")
    assert storage_error(FileNotFoundError(errno.ENOENT, "gone"), tmp_path) is None
    assert storage_error(ValueError("other"), tmp_path) is None


def test_the_loop_records_finished_and_failed_in_status_json(tmp_path):
    from test_loop import lora_model, make_batches, quick

    from lorakit.train import train
    from lorakit.train.rundir import read_status

    train(lora_model(), None, make_batches(2), None, quick(max_steps=2), tmp_path / "ok")
    done = read_status(tmp_path / "ok")
    assert (done["status"], done["step"], done["total_steps"]) == ("finished", 2, 2)
    masked = make_batches(2)
    for batch in masked:
        batch["labels"][:] = -100  # no supervised token: the first step raises DataError
    with pytest.raises(DataError):
        train(lora_model(), None, masked, None, quick(max_steps=2), tmp_path / "bad")
    failed = read_status(tmp_path / "bad")
    assert failed["status"] == "failed" and "no supervised token" in failed["error"]


def test_a_full_disk_at_any_write_then_resume_auto_ends_as_an_undisturbed_run(tmp_path):
    """Every write `train()` makes fails in turn (and every write after it, as on a full disk):
    the run stops with a clear error, and resume='auto' with room again ends at the adapter an
    undisturbed run gives, bit for bit, with one metrics row a step and no temporary file.
    (Every write of `lorakit train`, plots included: tests/cli/test_cli_full_disk.py, slow.)"""
    from test_loop import lora_model, make_batches, quick

    from full_disk import FullDisk, temporaries
    from lorakit.errors import LorakitError
    from lorakit.train import train
    from lorakit.train.log import read_metrics

    config = quick(max_steps=2, grad_accum_steps=1, save_every=1)
    batches = make_batches(3)

    def run(out, disk, resume=None):
        with pytest.MonkeyPatch.context() as patch:
            disk.install(patch)
            model = lora_model()
            return model, train(model, None, batches, None, config, out, resume=resume)

    clean = FullDisk(None)
    model, _ = run(tmp_path / "clean", clean)
    want = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    failures = []
    for at in range(1, clean.writes + 1):
        out, disk = tmp_path / f"full-at-{at}", FullDisk(at)
        try:
            run(out, disk)
        except LorakitError as error:
            assert "No space left on device" in str(error), error
        else:  # only where this run made fewer writes than the first (caches written once)
            assert disk.writes < at, f"write {at} failed, yet the run went on"
            continue
        try:
            model, _ = run(out, FullDisk(None), resume="auto")
        except Exception as error:
            failures.append(f"write {at}, resume: {type(error).__name__}: {error}")
            continue
        got = {k: v for k, v in model.state_dict().items() if "lora_" in k}
        if any(not torch.equal(got[k], want[k]) for k in want):
            failures.append(f"write {at}: the resumed adapter differs")
        steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
        if steps != [1, 2]:
            failures.append(f"write {at}: metrics.jsonl train steps {steps}")
        if temporaries(out):
            failures.append(f"write {at}: left {temporaries(out)}")
    assert failures == [], "\n".join(failures)


def test_overwrite_deletes_only_an_earlier_runs_files(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000002").mkdir(parents=True)
    (run / "final").mkdir()
    write_status(run, "finished")
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "notes.txt").write_text("mine")  # not a run file: kept
    assert {p.name for p in earlier_run(run)} == {
        "checkpoints",
        "final",
        "status.json",
        "metrics.jsonl",
    }
    delete_run(run)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    check_fresh_dir(run)  # a new run may start here now
    assert earlier_run(tmp_path / "nothing") == []


def test_overwrite_refuses_a_folder_no_run_wrote(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="not a run lorakit wrote"):
        delete_run(model)
    assert (model / "config.json").is_file() and (model / "model.safetensors").is_file()
    with pytest.raises(
        ConfigError, match="start that run over with `lorakit train ... --overwrite`"
    ):
        check_fresh_dir(model)
