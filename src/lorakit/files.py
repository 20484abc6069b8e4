"""Staging directories for atomic writes, made with the user's umask.

`tempfile.mkdtemp` makes its directory 0700 whatever the umask, so an adapter, a merged model or
the converted built-in model renamed into place from one would be private to its writer.
`staging_dir` makes a uniquely named directory with `os.mkdir`, which applies the umask (0755
under the usual 022), as for any other folder the user creates.
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
