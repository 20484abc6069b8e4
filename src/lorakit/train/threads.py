"""Fewer training threads while other work keeps this machine's CPUs busy.

torch runs each op on all its intra-op threads, which meet at a barrier when the op ends. When
other processes compete for the same cores, the scheduler gives each thread time slices at its
own moments, so at every barrier the threads wait for each other's next slice: beside one busy
process per core a 2-thread step took 3.2x its quiet time, where one thread took 2.6x that
quiet time (docs/benchmarks.md). `ThreadGovernor` measures, between steps, how many of this
process's CPUs other work used (from /proc/stat, the CPUs this process may run on, less its own
CPU time) and trains on the cores left over, at least one; when the other work stops, it goes
back to the full count. Two windows in a row must agree before it switches.

It runs for CPU training in one process only, and not when OMP_NUM_THREADS is set or
LORAKIT_FIXED_THREADS=1 (the thread count then stays as it is). Thread counts change the order
of some floating-point sums, so a run whose thread count changed differs from one that did not
in rounding only; set LORAKIT_FIXED_THREADS=1 where runs must match bit for bit.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch

FIXED_THREADS_ENV = "LORAKIT_FIXED_THREADS"
_BUSY_FIELDS = (0, 1, 2, 5, 6)  # user, nice, system, irq, softirq (guest is inside user)
_MIN_WINDOW_S = 1.0


def busy_cpu_seconds(cpus: set[int], path: str = "/proc/stat") -> float | None:
    """Seconds these CPUs spent busy since boot (every process), or None where unreadable."""
    try:
        with open(path, encoding="ascii") as f:
            lines = f.readlines()
        ticks = 0
        for line in lines:
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                ticks += sum(int(fields[i]) for i in _BUSY_FIELDS)
        return ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class ThreadGovernor:
    """Between steps, sets torch's thread count to the cores other work leaves free."""

    def __init__(
        self,
        cpus: set[int],
        threads: int,
        busy: Callable[[], float | None],
        own: Callable[[], float] = time.process_time,
        clock: Callable[[], float] = time.monotonic,
        set_threads: Callable[[int], None] = torch.set_num_threads,
    ) -> None:
        self.cpus, self.full, self.threads = len(cpus), threads, threads
        self._busy, self._own, self._clock, self._set = busy, own, clock, set_threads
        self._start = (busy(), own(), clock())
        self._pending: int | None = None  # a count one window asked for

    @classmethod
    def for_run(cls, device: torch.device, world_size: int) -> ThreadGovernor | None:
        """A governor for this run, or None where it does not apply (see the module's text)."""
        if (
            device.type != "cpu"
            or world_size > 1
            or os.environ.get(FIXED_THREADS_ENV, "") not in ("", "0")
            or "OMP_NUM_THREADS" in os.environ
            or torch.get_num_threads() < 2
            or not hasattr(os, "sched_getaffinity")
        ):
            return None
        cpus = os.sched_getaffinity(0)
        if busy_cpu_seconds(cpus) is None:
            return None
        return cls(cpus, torch.get_num_threads(), lambda: busy_cpu_seconds(cpus))

    def update(self) -> tuple[int, float] | None:
        """Measure the window since the last switch or measurement; on a switch, set the new
        count and return (threads, CPUs used by other work), else None."""
        busy, own, now = self._busy(), self._own(), self._clock()
        busy0, own0, then = self._start
        if now - then < _MIN_WINDOW_S:
            return None
        self._start = (busy, own, now)
        if busy is None or busy0 is None:
            return None
        others = max(0.0, (busy - busy0 - (own - own0)) / (now - then))
        want = max(1, min(self.full, round(self.cpus - others)))
        if want == self.threads:
            self._pending = None
            return None
        if self._pending != want:  # the next window must agree
            self._pending = want
            return None
        self._pending, self.threads = None, want
        self._set(want)
        return want, others

    def note(self, threads: int, others: float) -> str:
        """The line a run shows when `update` switched to `threads`."""
        if threads < self.full:
            return (
                f"other work is using {others:.1f} of this process's CPUs: training on {threads} "
                f"thread(s) instead of {self.full} until it stops ({FIXED_THREADS_ENV}=1 keeps "
                f"{self.full})"
            )
        return f"the CPUs are free again: training on {threads} threads"

    def restore(self) -> None:
        """Back to the count the run started with."""
        if self.threads != self.full:
            self.threads = self.full
            self._set(self.full)
