"""Atomic writes: a folder or a text / JSON file is complete at its path, or the old one is still
there.

Everything is first written under a temporary name in the same folder, fsynced, then renamed
into place, and the parent folder is fsynced. Replacing a folder is one atomic exchange of the
two paths (Linux renameat2 with RENAME_EXCHANGE), so the folder is never missing; where the
file system cannot exchange, the old folder is first renamed aside and put back if the second
rename fails.

Every temporary name lorakit writes follows one rule, so a cleanup finds them all:
`.lorakit-tmp-<pid>-<tag>-<name>`, where `<name>` is the final name and `<tag>` is random (a
folder or file being written) or `old` (a folder being replaced). `parse_temporary` reads such a
name back, and also the names lorakit used before (`.tmp-<name>-<pid>`, `.old-<name>-<pid>`,
`.status.json.<pid>`).

`tempfile.mkdtemp` makes its directory 0700 whatever the umask, so an adapter, a merged model or
the converted built-in model renamed into place from one would be private to its writer.
`staging_dir` makes its directory with `os.mkdir`, which applies the umask (0755 under the usual
022), as for any other folder the user creates; `apply_umask` does the same for the files
written into it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

TEMPORARY_PREFIX = ".lorakit-tmp-"
_TEMPORARY = re.compile(r"^\.lorakit-tmp-(?P<pid>\d+)-(?P<tag>old|[0-9a-f]{8})-(?P<name>.+)$")
# Names written before the rule above; still recognised, so the leftovers of older runs clean up.
_OLD_NAMES = (
    re.compile(r"^\.(?P<tag>tmp|old)-(?P<name>.+)-(?P<pid>\d+)$"),
    re.compile(r"^\.(?P<name>status\.json)\.(?P<pid>\d+)$"),
)
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class Temporary(NamedTuple):
    """What a temporary name says: the writer's pid, the final name, and whether it holds the
    old folder of a replacement (to be put back if the final name is gone)."""

    pid: int
    name: str
    old: bool


def temporary_name(name: str, old: bool = False) -> str:
    """The temporary name for writing `name` (or, with `old`, for the folder it replaces)."""
    tag = "old" if old else secrets.token_hex(4)
    return f"{TEMPORARY_PREFIX}{os.getpid()}-{tag}-{name}"


def parse_temporary(name: str) -> Temporary | None:
    """The parts of a temporary name lorakit writes (or wrote before), or None for other names."""
    for pattern in (_TEMPORARY, *_OLD_NAMES):
        match = pattern.match(name)
        if match:
            old = match.groupdict().get("tag") == "old"
            return Temporary(int(match.group("pid")), match.group("name"), old)
    return None


def is_temporary(name: str) -> bool:
    """True for a name lorakit gives (or gave) a file or folder while writing it."""
    return parse_temporary(name) is not None


def staging_dir(parent: str | Path, name: str) -> Path:
    """A new, empty directory `parent/<temporary name for name>` with the umask's mode."""
    parent = Path(parent)
    for _ in range(100):
        path = parent / temporary_name(name)
        try:
            os.mkdir(path)  # mode 0o777 & ~umask
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free staging directory name under {parent}")


def fsync_path(path: str | Path) -> None:
    """fsync one file or directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(
    path: str | Path,
    data: Any,
    *,
    indent: int | None = 2,
    sort_keys: bool = True,
    default: Callable[[Any], Any] | None = None,
) -> None:
    """Write `data` as JSON at `path` atomically (`write_text`)."""
    text = json.dumps(data, indent=indent, sort_keys=sort_keys, default=default) + "\n"
    write_text(path, text)


def write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) at `path` atomically: a temporary file in the same folder, fsynced,
    renamed over `path`, then the folder fsynced. Readers see the old file or the new one."""
    path = Path(path)
    tmp = path.parent / temporary_name(path.name)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_path(path.parent)


@contextlib.contextmanager
def atomic_dir(
    final: str | Path, marker: str | None = None, keep: Callable[[str], bool] | None = None
) -> Iterator[Path]:
    """Yield a staging directory next to `final`; on success fsync it, write the file `marker`
    (when given) last, and put it at `final` (replacing an older folder); on error remove it.

    `keep`: entries of the older folder that the new one does not hold, and whose name `keep`
    accepts, are carried into the new folder (hard links; copies where links cannot be made), so
    files the user put there survive. A symlink at `final` is followed: its target is replaced.
    """
    final = Path(os.path.abspath(final))
    if final.is_symlink():
        final = final.resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(final.parent, final.name)
    try:
        yield staging
        if keep is not None and final.is_dir():
            _carry_over(final, staging, keep)
        for path in sorted(staging.rglob("*"), reverse=True):
            if not path.is_symlink() and (path.is_file() or path.is_dir()):
                fsync_path(path)
        if marker:
            (staging / marker).write_text("ok\n")
            fsync_path(staging / marker)
        fsync_path(staging)
        cwd = _cwd_under(final)
        _replace(staging, final)
        fsync_path(final.parent)
        if cwd is not None:  # the process stood in the old folder, now deleted: stand in the new
            with contextlib.suppress(OSError):
                os.chdir(cwd)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _carry_over(old: Path, new: Path, keep: Callable[[str], bool]) -> None:
    """Link (or copy) the entries of `old` that `new` lacks and `keep` accepts into `new`."""
    for item in old.iterdir():
        target = new / item.name
        if target.exists() or target.is_symlink() or not keep(item.name):
            continue
        if item.is_symlink():
            os.symlink(os.readlink(item), target)
        elif item.is_dir():
            shutil.copytree(item, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(item, target)


def _link_or_copy(source: str | Path, target: str | Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _cwd_under(folder: Path) -> str | None:
    """The working directory when it is `folder` or inside it, else None."""
    try:
        cwd = os.getcwd()
    except OSError:
        return None
    return cwd if Path(cwd) == folder or folder in Path(cwd).parents else None


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
        old = final.parent / temporary_name(final.name, old=True)
        os.rename(final, old)
        try:
            os.rename(staging, final)
        except BaseException:
            os.rename(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)


def other_than_file(path: str | Path) -> str | None:
    """What stands at `path` when it is there but is not a regular file ('a FIFO', 'a
    directory', ...; symlinks followed), else None (a regular file, or nothing)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    kinds = [
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ]
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def current_umask() -> int:
    """The process umask (read from /proc where it can be, so it is never changed, even
    briefly; elsewhere set and restored at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(directory: str | Path) -> None:
    """Give every file under `directory` the mode a new file gets (0o666 & ~umask): some
    writers (safetensors) create their files 0600."""
    mode = 0o666 & ~current_umask()
    for path in Path(directory).rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)
