"""bench_train.py's shared-CPU side: the OpenMP settings a worker runs with (--omp-policy x
--threads) and `run`, which times lorakit's step quietly and beside N busy processes
(`bench_train.py --contention N`)."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time

OPENMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "LORAKIT_NO_WAIT_POLICY")
# a busy process: pure CPU, no memory traffic; it stops by itself once the driver is gone
SPINNER = """
import os
parent = os.getppid()
while os.getppid() == parent:
    for _ in range(10**6):
        pass
"""


def openmp_env(policy: str, threads: str) -> dict[str, str]:
    """A worker's OpenMP variables for one --omp-policy and --threads value; the worker's
    re-exec is told to add none of its own, so each policy means exactly what it says."""
    from lorakit.startup import NO_WAIT_POLICY_ENV, WAIT_POLICY

    env = {NO_WAIT_POLICY_ENV: "1"}
    if policy == "lorakit":
        env.update(WAIT_POLICY)
    elif policy in ("passive", "active"):
        env["OMP_WAIT_POLICY"] = policy.upper()
    elif policy.isdigit():
        env["GOMP_SPINCOUNT"] = policy
    elif policy != "unset":
        raise ValueError(
            f"--omp-policy {policy!r}: expected lorakit, unset, passive, active or a spin count"
        )
    if threads != "default":
        if not threads.isdigit() or int(threads) < 1:
            raise ValueError(f"--threads {threads!r}: expected a count >= 1 or default")
        env["OMP_NUM_THREADS"] = threads
    return env


def openmp_settings(args) -> list[tuple[str, str]]:
    """Every (--omp-policy, --threads) pair, in the order given."""
    return list(itertools.product(args.omp_policy.split(","), args.threads.split(",")))


def _interrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt


@contextlib.contextmanager
def busy_processes(count: int):
    """`count` busy processes running beside the block, killed afterwards whatever happens (a
    SIGTERM to the driver unwinds it too); each also stops by itself when the driver dies."""
    old = signal.signal(signal.SIGTERM, _interrupt)
    spinners = []
    try:
        for _ in range(count):
            spinners.append(
                subprocess.Popen([sys.executable, "-c", SPINNER], start_new_session=True)
            )
        time.sleep(1.0)  # all of them running before the worker starts
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
        for spinner in spinners:
            spinner.wait()
        signal.signal(signal.SIGTERM, old)


def run(args, run_config, batch: tuple[int, int]) -> list[dict]:
    """lorakit's step on its own and beside --contention busy processes, per OpenMP setting;
    `run_config` runs one configuration in a worker (bench_train.run_config), on batches of
    `batch` (rows, length)."""
    import torch

    print(
        f"batch {batch[0]} x {batch[1]}, {args.steps} timed steps after {args.warmup} warmup, "
        f"{os.cpu_count()} CPUs ({torch.backends.cpu.get_cpu_capability()}), torch "
        f"{torch.__version__}, {args.contention} busy processes"
    )
    print(
        f"{'model':8} {'case':11} {'policy':8} {'threads':>7} {'quiet s/step':>12} "
        f"{'busy s/step':>11} {'busy/quiet':>10} {'quiet vs 1st':>12} {'load':>9}  busy threads"
    )
    results = []
    for model, case in itertools.product(args.models.split(","), args.cases.split(",")):
        data, precision = case.split("-")
        first = None
        for policy, threads in openmp_settings(args):
            openmp = openmp_env(policy, threads)
            row = {"model": model, "case": case, "policy": policy, "threads": threads}
            row["load_quiet"] = os.getloadavg()[0]
            row["quiet"] = run_config(model, "lorakit", precision, data, "auto", args, openmp)
            with busy_processes(args.contention):
                row["load_busy"] = os.getloadavg()[0]
                row["busy"] = run_config(model, "lorakit", precision, data, "auto", args, openmp)
            results.append(row)
            quiet, busy = row["quiet"], row["busy"]
            if "error" in quiet or "error" in busy:
                print(
                    f"{model:8} {case:11} {policy:8} {threads:>7} error: "
                    f"{quiet.get('error') or busy.get('error')}",
                    flush=True,
                )
                continue
            first = first or quiet["step_s"]
            row["ratio"] = busy["step_s"] / quiet["step_s"]
            row["quiet_cost"] = quiet["step_s"] / first
            print(
                f"{model:8} {case:11} {policy:8} {quiet['threads']:>7} {quiet['step_s']:12.2f} "
                f"{busy['step_s']:11.2f} {row['ratio']:9.2f}x {row['quiet_cost']:11.3f}x "
                f"{row['load_quiet']:4.1f}/{row['load_busy']:<4.1f}  {busy.get('step_threads')}",
                flush=True,
            )
    return results
