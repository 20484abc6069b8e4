"""The process environment the command line starts with: tcmalloc and a short OpenMP spin,
set by re-executing the process once, before anything heavy is imported.

libgomp and the allocator read their settings only when they are loaded (by `import torch`), so
the variables must be in the environment before that; re-executing first, with nothing loaded
but the command line's own modules, costs a fraction of a second (not a second `import torch`)
and keeps the start-up short enough that a Ctrl-C lands in code that handles it.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Mapping

NO_TCMALLOC_ENV = "LORAKIT_NO_TCMALLOC"
NO_WAIT_POLICY_ENV = "LORAKIT_NO_WAIT_POLICY"
WAIT_POLICY = {"GOMP_SPINCOUNT": "10000"}
_OPENMP_WAIT_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
_REEXEC_ENV = "LORAKIT_REEXEC"
_TCMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
)


def find_tcmalloc() -> str | None:
    """Path of libtcmalloc_minimal on this machine, or None."""
    for path in _TCMALLOC_PATHS:
        if os.path.exists(path):
            return path
    name = ctypes.util.find_library("tcmalloc_minimal")
    return name if name else None


def tcmalloc_loaded() -> bool:
    """True when tcmalloc is mapped into this process."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            return "tcmalloc" in f.read()
    except OSError:
        return "tcmalloc" in os.environ.get("LD_PRELOAD", "")


def startup_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables the CLI adds to `environ` before torch loads; {} when there is nothing to add.

    - LD_PRELOAD gains tcmalloc when it is installed and not loaded yet: CPU training is
      1.25-1.75x faster with it. LORAKIT_NO_TCMALLOC=1 opts out.
    - WAIT_POLICY for GNU OpenMP (torch's intra-op threads, MKL, oneDNN): a thread that waits
      for the others spins for a short while, then sleeps. libgomp's own default spins for
      ~3 ms, which on a CPU shared with other work burns the time slices the other threads
      need: beside one busy process per core a step took 5.3x its quiet time with it, 3.0x
      with this, at +3-5% on a quiet machine (OMP_WAIT_POLICY=PASSIVE: 2.7-3.0x, +16-21%;
      docs/benchmarks.md). The user's OMP_WAIT_POLICY or GOMP_SPINCOUNT wins, and
      OMP_NUM_THREADS is left to them; LORAKIT_NO_WAIT_POLICY=1 keeps libgomp's default.
    """
    changes = {}
    if not environ.get(NO_WAIT_POLICY_ENV) and not any(k in environ for k in _OPENMP_WAIT_ENV):
        changes.update(WAIT_POLICY)
    lib = None if environ.get(NO_TCMALLOC_ENV) or tcmalloc_loaded() else find_tcmalloc()
    if lib is not None:
        changes["LD_PRELOAD"] = ":".join(p for p in (lib, environ.get("LD_PRELOAD", "")) if p)
    return changes


def reexec_for_speed(argv: list[str] | None = None) -> bool:
    """Re-exec this process once with `startup_env`'s additions (Linux only).

    Call first thing at start-up, before torch is imported. Returns False when nothing was
    done (it does not return at all when it re-execs).
    """
    if os.environ.get(_REEXEC_ENV) or not sys.platform.startswith("linux"):
        return False
    changes = startup_env(os.environ)
    if not changes:
        return False
    env = {**os.environ, **changes, _REEXEC_ENV: "1"}  # never loop, even if a preload fails
    args = (
        argv if argv is not None else list(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *args[1:]], env)
    return True  # pragma: no cover
