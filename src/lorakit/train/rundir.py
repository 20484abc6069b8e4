"""The run directory: folders replaced atomically, leftovers of killed writers, what a fresh run
refuses to write over, and write failures (disk full, read-only) as clear errors.

A folder (`checkpoints/step-N`, `final`, `best`) is staged in a sibling `.tmp-<name>-<pid>`,
every file fsynced, then renamed into place. Replacing an existing folder is one atomic
exchange of the two paths (Linux renameat2 with RENAME_EXCHANGE), so `best/` is never missing;
where the file system cannot exchange, the old folder is first renamed to `.old-<name>-<pid>`
and put back if the second rename fails. A run that starts cleans the leftovers of writers that
died: it deletes their staging folders and restores an `.old-` folder whose name is gone.

`status.json` says what the run is doing: `running` (with the writer's host and pid, so a
reader can tell a run whose process died), then `finished`, `interrupted` or `failed` (with
the error).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError, StorageError

# What a run writes at the top of its output_dir; a fresh run refuses a directory holding any.
RUN_FILES = (
    "config.json", "config.yaml", "metrics.jsonl", "samples.jsonl", "status.json", "final", "best",
    "plots", "tensorboard", "checkpoints",
)  # fmt: skip
STATUS = "status.json"
RUN_STATES = ("running", "finished", "interrupted", "failed")
_LEFTOVER = re.compile(r"^\.(tmp|old)-(.+)-(\d+)$")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def fsync_path(path: Path) -> None:
    """fsync one file or directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, data: Any) -> None:
    """Write JSON and fsync it."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step; False where the system or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _replace(staging: Path, final: Path) -> None:
    """Put `staging` at `final`, replacing what is there; `final` exists at every moment after."""
    if not final.exists():
        os.rename(staging, final)
    elif _exchange(staging, final):
        shutil.rmtree(staging, ignore_errors=True)  # it now holds the old folder
    else:
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        try:
            os.rename(staging, final)
        except BaseException:
            os.rename(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: Path, marker: str | None = None) -> Iterator[Path]:
    """Yield a staging directory next to `final`; on success fsync it, write the file `marker`
    (when given) last, and put it at `final` (replacing an older one); on error remove it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        for path in sorted(staging.rglob("*"), reverse=True):
            fsync_path(path)
        if marker:
            (staging / marker).write_text("ok\n")
            fsync_path(staging / marker)
        fsync_path(staging)
        _replace(staging, final)
        fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_status(output_dir: Path, status: str, **fields: Any) -> None:
    """Record the run's state in status.json (replaced atomically; readers never see half)."""
    assert status in RUN_STATES, status
    record = {"status": status, "time": time.time(), **fields}
    if status == "running":
        record.update(host=socket.gethostname(), pid=os.getpid())
    tmp = output_dir / f".{STATUS}.{os.getpid()}"
    tmp.write_text(json.dumps(record, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, output_dir / STATUS)


def read_status(output_dir: Path) -> dict[str, Any]:
    """The run's state: status.json's record, with a `running` run whose process is gone on
    this host reported as `failed`. Folders without status.json are judged by what they hold:
    `final/` finished, checkpoints only interrupted; otherwise the status is `unknown`."""
    path = Path(output_dir) / STATUS
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or record.get("status") not in RUN_STATES:
        if (Path(output_dir) / "final").is_dir():
            return {"status": "finished"}
        if (Path(output_dir) / "checkpoints").is_dir():
            return {"status": "interrupted"}
        return {"status": "unknown"}
    if record["status"] == "running" and record.get("host") == socket.gethostname():
        pid = record.get("pid")
        if isinstance(pid, int) and not _alive(pid):
            record.update(
                status="failed",
                error=f"the training process (pid {pid}) is gone without recording how the run "
                "ended (killed?)",
            )
    return record


def _alive(pid: int) -> bool:
    """True when a process with this id exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(directory: Path) -> list[str]:
    """Delete the staging folders of writers that died, restore an `.old-` folder whose name
    is gone (a writer killed between two renames); return what was done, one line each."""
    done: list[str] = []
    if not directory.is_dir():
        return done
    for path in sorted(directory.iterdir()):
        match = _LEFTOVER.match(path.name)
        if not match or not path.is_dir() or int(match.group(3)) == os.getpid():
            continue
        kind, name, pid = match.group(1), match.group(2), int(match.group(3))
        if _alive(pid):
            continue
        if kind == "old" and not (directory / name).exists():
            os.rename(path, directory / name)
            done.append(f"restored {directory / name} from {path.name}")
        else:
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path}, left by a writer that stopped")
    return done


def check_fresh_dir(output_dir: Path) -> None:
    """Refuse to start a new run in a directory that holds files the run would write."""
    found = [name for name in RUN_FILES if (output_dir / name).exists()]
    if not found:
        return
    listed = ", ".join(n + "/" if (output_dir / n).is_dir() else n for n in found)
    weights = any(output_dir.glob("*.safetensors")) or any(output_dir.glob("*.bin"))
    what = " (it is a model folder)" if "config.json" in found and weights else ""
    raise ConfigError(
        f"output_dir {output_dir} already holds {listed}{what}, which a new run would write "
        "over; choose a new output_dir, or move those files away"
        + ("; to continue that run pass resume='auto'" if "checkpoints" in found else "")
    )


def os_error_code(err: BaseException) -> int | None:
    """The errno of an OSError, or of a safetensors error that wraps one ('os error 28')."""
    if isinstance(err, OSError):
        return err.errno
    match = re.search(r"os error (\d+)", str(err))
    return int(match.group(1)) if match else None


_WRITE_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EFBIG,
                 errno.EIO}  # fmt: skip


def storage_error(err: BaseException, output_dir: Path) -> StorageError | None:
    """The clear error for a failed write under output_dir (disk full, read-only, ...), or
    None when `err` is not one."""
    code = os_error_code(err)
    if code not in _WRITE_ERRORS:
        return None
    where = getattr(err, "filename", None) or output_dir
    return StorageError(
        f"cannot write {where}: {os.strerror(code)}. The files being written were removed and "
        "the complete checkpoints are intact; free space (or make the directory writable) and "
        "continue with resume='auto' (--resume auto)"
    )
