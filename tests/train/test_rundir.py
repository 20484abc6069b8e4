"""The run directory: atomic replacement, leftovers of killed writers, what a fresh run refuses,
write failures named."""

from __future__ import annotations

import errno
import os

import pytest
from safetensors import SafetensorError

from lorakit.errors import ConfigError, DataError
from lorakit.train import rundir
from lorakit.train.rundir import atomic_dir, check_fresh_dir, clean_leftovers, storage_error

DEAD = 2**30  # above Linux's largest pid: no process has it


def write(folder, text):
    with atomic_dir(folder) as staging:
        (staging / "file").write_text(text)


@pytest.mark.parametrize("exchange", [True, False])
def test_replacing_a_folder_leaves_only_the_new_one(tmp_path, monkeypatch, exchange):
    if not exchange:  # a file system without RENAME_EXCHANGE: two renames
        monkeypatch.setattr(rundir, "_exchange", lambda a, b: False)
    write(tmp_path / "best", "old")
    write(tmp_path / "best", "new")
    assert (tmp_path / "best" / "file").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_a_failed_second_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "_exchange", lambda a, b: False)
    write(tmp_path / "best", "old")
    real_rename, calls = os.rename, []

    def rename(a, b):
        calls.append(a)
        if len(calls) == 2:  # staging -> best
            raise OSError(errno.EIO, "I/O error")
        real_rename(a, b)

    monkeypatch.setattr(rundir.os, "rename", rename)
    with pytest.raises(OSError, match="I/O error"):
        write(tmp_path / "best", "new")
    assert (tmp_path / "best" / "file").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_leftovers_of_dead_writers_are_cleaned_and_a_lost_folder_restored(tmp_path):
    for name in (f".old-best-{DEAD}", f".tmp-best-{DEAD}", f".tmp-final-{DEAD}", "final",
                 f".old-final-{DEAD}", f".tmp-final-{os.getpid()}"):  # fmt: skip
        (tmp_path / name).mkdir()
        (tmp_path / name / "file").write_text(name)
    done = clean_leftovers(tmp_path)
    assert len(done) == 4 and done[0].startswith("restored")
    # the killed writer's old best/ is back; our own staging folder is left alone
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".tmp-final-{os.getpid()}", "best",
                                                           "final"]  # fmt: skip
    assert (tmp_path / "best" / "file").read_text() == f".old-best-{DEAD}"
    assert (tmp_path / "final" / "file").read_text() == "final"


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
