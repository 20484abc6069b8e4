"""Atomic writes: a folder or JSON file is the old one or the complete new one, whatever fails
on the way, and no temporary is left behind; every temporary name follows one rule. Staging
directories (and so saved adapters, merged models, the converted built-in model) get the user's
umask, not mkdtemp's 0700; the files inside stay readable as the umask allows."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest

from conftest import make_tiny_llama
from lorakit import LoraConfig, files, get_peft_model
from lorakit.files import (
    atomic_dir,
    is_temporary,
    parse_temporary,
    staging_dir,
    temporary_name,
    write_json,
)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_staging_dir_uses_the_umask(tmp_path, umask_027):
    first, second = staging_dir(tmp_path, "x"), staging_dir(tmp_path, "x")
    assert first != second and is_temporary(first.name) and not any(first.iterdir())
    assert mode(first) == 0o750  # 0o777 & ~0o027


def test_a_saved_adapter_is_as_readable_as_the_umask_says(tmp_path):
    old = os.umask(0o022)
    try:
        lora = get_peft_model(make_tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
        lora.chat_template = "{{ messages }}"
        lora.save_pretrained(tmp_path / "adapter")
    finally:
        os.umask(old)
    assert mode(tmp_path / "adapter") == 0o755
    for path in (tmp_path / "adapter").iterdir():
        assert mode(path) == 0o644, path.name


def test_apply_umask_reads_the_umask_without_changing_it(tmp_path, umask_027):
    from lorakit.files import apply_umask, current_umask

    (tmp_path / "sub").mkdir()
    private = tmp_path / "sub" / "weights.bin"
    private.write_bytes(b"x")
    private.chmod(0o600)  # as safetensors writes its files
    assert current_umask() == 0o027 and current_umask() == 0o027
    apply_umask(tmp_path)
    assert mode(private) == 0o640


def write(folder, text, **options):
    with atomic_dir(folder, **options) as staging:
        (staging / "file").write_text(text)


def names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("exchange", [True, False])
def test_replacing_a_folder_leaves_only_the_new_one(tmp_path, monkeypatch, exchange):
    if not exchange:  # a file system without RENAME_EXCHANGE: two renames
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    write(tmp_path / "best", "old")
    write(tmp_path / "best", "new")
    assert (tmp_path / "best" / "file").read_text() == "new"
    assert names(tmp_path) == ["best"]


def test_a_failure_while_writing_a_folder_leaves_the_old_one_and_no_temporary(tmp_path):
    write(tmp_path / "best", "old")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "best") as staging:
        (staging / "file").write_text("half")
        raise RuntimeError("disk full")
    assert (tmp_path / "best" / "file").read_text() == "old"
    assert names(tmp_path) == ["best"]


def test_a_failed_second_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    write(tmp_path / "best", "old")
    real_rename, calls = os.rename, []

    def rename(a, b):
        calls.append(a)
        if len(calls) == 2:  # staging -> best
            raise OSError(errno.EIO, "I/O error")
        real_rename(a, b)

    monkeypatch.setattr(files.os, "rename", rename)
    with pytest.raises(OSError, match="I/O error"):
        write(tmp_path / "best", "new")
    assert (tmp_path / "best" / "file").read_text() == "old"
    assert names(tmp_path) == ["best"]


def test_keep_carries_the_other_files_of_the_old_folder_over(tmp_path):
    write(tmp_path / "out", "old")
    (tmp_path / "out" / "notes.txt").write_text("mine")
    (tmp_path / "out" / "other").mkdir()
    (tmp_path / "out" / "other" / "weights").write_text("w")
    (tmp_path / "out" / "stale").write_text("s")
    write(tmp_path / "out", "new", keep=lambda name: name != "stale")
    assert names(tmp_path / "out") == ["file", "notes.txt", "other"]
    assert (tmp_path / "out" / "file").read_text() == "new"
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "out" / "other" / "weights").read_text() == "w"
    write(tmp_path / "out", "newer")  # without keep: only what was written
    assert names(tmp_path / "out") == ["file"]


def test_writing_the_working_directory_stays_in_it(tmp_path, monkeypatch):
    write(tmp_path / "out", "old")
    monkeypatch.chdir(tmp_path / "out")
    write(".", "new")
    assert Path("file").read_text() == "new" and names(tmp_path) == ["out"]


def test_write_json_replaces_the_file_whole(tmp_path):
    path = tmp_path / "state.json"
    write_json(path, {"b": 1, "a": [1, 2]})
    assert json.loads(path.read_text()) == {"b": 1, "a": [1, 2]}
    assert path.read_text().index('"a"') < path.read_text().index('"b"')  # sorted by default
    write_json(path, {"b": 2, "a": 0}, indent=None, sort_keys=False)
    assert path.read_text() == '{"b": 2, "a": 0}\n'


@pytest.mark.parametrize("fail_at", ["write", "replace"])
def test_a_failed_json_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, fail_at):
    path = tmp_path / "status.json"
    write_json(path, {"status": "running"})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if fail_at == "write":
        monkeypatch.setattr(files.os, "fsync", full)
    else:
        monkeypatch.setattr(files.os, "replace", full)
    with pytest.raises(OSError, match="No space"):
        write_json(path, {"status": "finished"})
    assert json.loads(path.read_text()) == {"status": "running"}
    assert names(tmp_path) == ["status.json"]


def test_one_naming_rule_for_temporaries_and_the_old_names_still_read():
    name = temporary_name("adapter-v2")
    assert name.startswith(".lorakit-tmp-") and is_temporary(name)
    assert parse_temporary(name) == (os.getpid(), "adapter-v2", False)
    assert parse_temporary(temporary_name("best", old=True)) == (os.getpid(), "best", True)
    assert parse_temporary(".tmp-step-00000007-99") == (99, "step-00000007", False)
    assert parse_temporary(".old-best-12") == (12, "best", True)
    assert parse_temporary(".status.json.4242") == (4242, "status.json", False)
    for other in ("best", ".hidden", ".lorakit-tmp-x", "notes.tmp"):
        assert not is_temporary(other), other


def test_other_than_file_says_what_stands_there(tmp_path):
    (tmp_path / "file").write_text("x")
    os.mkfifo(tmp_path / "pipe")
    os.symlink(tmp_path / "pipe", tmp_path / "link")
    assert files.other_than_file(tmp_path / "file") is None
    assert files.other_than_file(tmp_path / "missing") is None
    assert files.other_than_file(tmp_path) == "a directory"
    assert files.other_than_file(tmp_path / "pipe") == "a named pipe (FIFO)"
    assert files.other_than_file(tmp_path / "link") == "a named pipe (FIFO)"  # followed


def test_write_text_replaces_the_file_whole_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    files.write_text(path, "a: 1\n")
    files.write_text(path, "a: 2\n")
    assert path.read_text() == "a: 2\n" and [p.name for p in tmp_path.iterdir()] == [path.name]

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        files.write_text(path, "a: 3\n")
    assert path.read_text() == "a: 2\n" and [p.name for p in tmp_path.iterdir()] == [path.name]
