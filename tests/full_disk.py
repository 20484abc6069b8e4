"""A disk that fills up, simulated at the writes lorakit makes (files opened for writing,
safetensors files, directories): from a chosen write on, every write fails with ENOSPC after
writing half its data, as a real full disk does. No tests live here."""

from __future__ import annotations

import builtins
import errno
import importlib
import io
import os
from pathlib import Path

import pytest
from safetensors import SafetensorError

from lorakit.files import is_temporary

SAVERS = ("lorakit.train.checkpoint", "lorakit.lora.adapters")  # modules calling save_file
WRITE_MODES = set("wax+")


class FullDisk:
    """Counts writes; from write number `at` on, each fails with ENOSPC (half its data
    written). at=None: nothing fails (a count of the writes a run makes)."""

    def __init__(self, at: int | None) -> None:
        self.at, self.writes = at, 0

    def full(self) -> bool:
        self.writes += 1
        return self.at is not None and self.writes >= self.at

    @staticmethod
    def error(path: object) -> OSError:
        return OSError(errno.ENOSPC, "No space left on device", str(path))

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_open, real_mkdir = builtins.open, os.mkdir

        def opener(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            if isinstance(file, int) or not WRITE_MODES & set(mode) or not self.full():
                return handle
            return _HalfWrites(handle, self.error(file))

        def mkdir(path, *args, **kwargs):
            if self.full():
                raise self.error(path)
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", opener)
        monkeypatch.setattr(io, "open", opener)
        monkeypatch.setattr(os, "mkdir", mkdir)
        for name in SAVERS:
            module = importlib.import_module(name)
            monkeypatch.setattr(module, "save_file", self._saver(module.save_file))

    def _saver(self, real):
        def save_file(tensors, filename, *args, **kwargs):
            real(tensors, filename, *args, **kwargs)
            if self.full():  # the file is cut short, as when the disk filled while writing it
                size = os.path.getsize(filename)
                os.truncate(filename, size // 2)
                raise SafetensorError(
                    "Error while serializing: I/O error: No space left on device (os error 28)"
                )

        return save_file


class _HalfWrites:
    """A file whose first write puts down half the data, then fails as a full disk does."""

    def __init__(self, handle, error: OSError) -> None:
        self._handle, self._error = handle, error

    def write(self, data):
        self._handle.write(data[: len(data) // 2])
        self._handle.flush()
        raise self._error

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


def temporaries(folder: Path) -> list[str]:
    """Every file or folder under `folder` with a temporary name (`lorakit.files`)."""
    return [str(p) for p in folder.rglob("*") if is_temporary(p.name)]
