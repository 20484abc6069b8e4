"""`lorakit estimate` against measured peak memory of the built-in model's runs (CPU).

Each case runs `python -m lorakit train` in a fresh process for a few steps (packed rows, so
every row holds max_length tokens, as the estimate assumes) and reads two peaks: the whole
process's (ru_maxrss of the child: loading included) and the training loop's own `memory_mb`
(VmHWM since training began, from metrics.jsonl). Both are printed next to the estimate.

Usage: nice -n 10 python benchmarks/bench_estimate.py [--steps 3] [--cases lora,full,...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from lorakit.jobs.estimate import MIB, estimate_memory
from lorakit.jobs.run_config import load_run_config

BASE = {
    "model": {"name_or_path": "smollm2-135m-instruct", "dtype": "float32"},
    "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "preset"},
    "data": {"dataset": "identity", "max_length": 256, "packing": True},
    "eval": {"limit": 4},
    "train": {
        "batch_size": 4,
        "precision": "fp32",
        "progress": "plain",
        "tensorboard": False,
        "plots": False,
    },
}
CASES = {
    "lora": {"method": "lora"},
    "full": {"method": "full"},
    "lora-checkpointed": {"method": "lora", "train": {"gradient_checkpointing": True}},
    "full-checkpointed": {"method": "full", "train": {"gradient_checkpointing": True}},
}


def merged(base: dict, extra: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in extra.items():
        out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


def run_case(name: str, steps: int, folder: Path) -> dict:
    config = merged(BASE, CASES[name])
    config["train"] = {**config["train"], "max_steps": steps}
    config["output_dir"] = str(folder / name)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    estimate = estimate_memory(load_run_config(path), 1)
    log = folder / f"{name}.stderr"
    with open(log, "w") as err:
        child = subprocess.Popen(
            [sys.executable, "-m", "lorakit", "train", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name} failed:\n{log.read_text()[-2000:]}")
    rows = [json.loads(line) for line in (folder / name / "metrics.jsonl").open()]
    return {
        "estimate_mib": estimate.total / MIB,
        "process peak": usage.ru_maxrss / 1024,  # Linux: KiB
        "loop peak": max(r.get("memory_mb", 0.0) for r in rows),
        "table": estimate.table(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cases", default="lora,full")
    args = parser.parse_args()
    print(os.popen("uptime").read().strip())
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases.split(","):
            result = run_case(name, args.steps, Path(tmp))
            print(result["table"])
            for label in ("process peak", "loop peak"):
                value, predicted = result[label], result["estimate_mib"]
                print(
                    f"{name}: estimate {predicted:.0f} MiB, {label} {value:.0f} MiB "
                    f"(estimate {(predicted - value) / value:+.0%})"
                )
            print(flush=True)


if __name__ == "__main__":
    main()
