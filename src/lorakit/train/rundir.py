"""The run directory: the run's state, leftovers of killed writers, what a fresh run refuses to
write over, and write failures (disk full, read-only) as clear errors.

Folders (`checkpoints/step-N`, `final`, `best`) and JSON files are written with
`lorakit.files.atomic_dir` / `write_json`: staged under a temporary name, fsynced, renamed into
place, so `best/` is never missing. A run that starts cleans the leftovers of writers that died:
it deletes their temporary files and folders and restores an old folder whose name is gone.

`status.json` says what the run is doing: `running` (with the writer's host and pid, so a
reader can tell a run whose process died), then `finished`, `interrupted` or `failed` (with
the error).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError, StorageError
from lorakit.files import parse_temporary, write_json

# What a run writes at the top of its output_dir; a fresh run refuses a directory holding any.
RUN_FILES = (
    "config.json",
    "config.yaml",
    "metrics.jsonl",
    "samples.jsonl",
    "status.json",
    "final",
    "best",
    "plots",
    "tensorboard",
    "checkpoints",
)
STATUS = "status.json"
RUN_STATES = ("running", "finished", "interrupted", "failed")


def write_status(output_dir: Path, status: str, **fields: Any) -> None:
    """Record the run's state in status.json (replaced atomically; readers never see half)."""
    assert status in RUN_STATES, status
    record = {"status": status, "time": time.time(), **fields}
    if status == "running":
        record.update(host=socket.gethostname(), pid=os.getpid())
    write_json(Path(output_dir) / STATUS, record, indent=None, default=str)


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


def ended_unfinished(output_dir: Path) -> bool:
    """True when `output_dir` holds a run that ended (failed, interrupted, or its process gone)
    without finishing: its files are that run's own, which `resume='auto'` may start over
    when it has no checkpoint to continue."""
    record = read_status(output_dir)
    status = record["status"]
    if status == "running" and record.get("pid") == os.getpid():
        status = "failed"  # an earlier run of this process: it is not running now
    return status in ("failed", "interrupted")


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
    """Delete the temporary files and folders of writers that died (`files.parse_temporary`
    names), restore an old folder whose name is gone (a writer killed between two renames);
    return what was done, one line each."""
    done: list[str] = []
    if not directory.is_dir():
        return done
    for path in sorted(directory.iterdir()):
        temporary = parse_temporary(path.name)
        if temporary is None or temporary.pid == os.getpid() or _alive(temporary.pid):
            continue
        if temporary.old and path.is_dir() and not (directory / temporary.name).exists():
            os.rename(path, directory / temporary.name)
            done.append(f"restored {directory / temporary.name} from {path.name}")
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
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
        "over; choose a new output_dir, move those files away, or start that run over with "
        "`lorakit train ... --overwrite`"
        + ("; to continue that run pass resume='auto'" if "checkpoints" in found else "")
    )


def earlier_run(output_dir: Path) -> list[Path]:
    """The files and folders of an earlier run in output_dir, which starting over deletes;
    ConfigError where the folder holds run-like files no lorakit run wrote (a model folder)."""
    found = [output_dir / name for name in RUN_FILES if (output_dir / name).exists()]
    if found and not ((output_dir / STATUS).is_file() or (output_dir / "metrics.jsonl").is_file()):
        raise ConfigError(
            f"output_dir {output_dir} holds {', '.join(p.name for p in found)} but no "
            f"{STATUS} or metrics.jsonl: not a run lorakit wrote (a model folder?), so "
            "--overwrite leaves it alone; choose a new output_dir"
        )
    return found


def delete_run(output_dir: Path) -> list[Path]:
    """Delete an earlier run's files in output_dir (`earlier_run`); other files stay."""
    found = earlier_run(output_dir)
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return found


def os_error_code(err: BaseException) -> int | None:
    """The errno of an OSError, or of a safetensors error that wraps one ('os error 28')."""
    if isinstance(err, OSError):
        return err.errno
    match = re.search(r"os error (\d+)", str(err))
    return int(match.group(1)) if match else None


_WRITE_ERRORS = {
    errno.ENOSPC,
    errno.EROFS,
    errno.EDQUOT,
    errno.EACCES,
    errno.EPERM,
    errno.EFBIG,
    errno.EIO,
}


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
