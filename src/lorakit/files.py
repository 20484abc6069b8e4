"""Staging directories for atomic writes, made with the user's umask.

`tempfile.mkdtemp` makes its directory 0700 whatever the umask, so an adapter, a merged model or
the converted built-in model renamed into place from one would be private to its writer.
`staging_dir` makes a uniquely named directory with `os.mkdir`, which applies the umask (0755
under the usual 022), as for any other folder the user creates; `apply_umask` does the same for
the files written into it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def staging_dir(parent: str | Path, prefix: str) -> Path:
    """A new, empty directory `parent/<prefix><random>` with the umask's mode."""
    parent = Path(parent)
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(path)  # mode 0o777 & ~umask
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free staging directory name under {parent}")


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
