"""LoRA vs DoRA vs PiSSA initialisation at the same rank: time per step, peak memory, eval loss.

Each variant is one `lorakit train` run in its own process on the built-in SmolLM2-135M-Instruct
(fp32), the built-in `identity` dataset, r=16, lora_alpha=32, the preset targets (all 7
projections), the same seed, data order and learning rate; only `lora.use_dora` /
`lora.init_lora_weights` differ. Numbers come from the run's own metrics.jsonl: median
`step_s` over the steps after the first, the largest `memory_mb` (peak RSS), and the eval loss
on the identity test split before and after training.

    nice -n 10 python benchmarks/bench_variants.py                  # 20 steps each
    nice -n 10 python benchmarks/bench_variants.py --steps 5 --variants lora,dora
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "lora": [],
    "dora": ["lora.use_dora=true"],
    "pissa": ["lora.init_lora_weights=pissa"],
}


def run_variant(name: str, steps: int, batch: int, threads: int, folder: Path) -> dict:
    """One training run; returns its step time, peak memory and eval losses."""
    config = {
        "output_dir": str(folder / name),
        "model": {"name_or_path": "smollm2-135m-instruct"},
        "lora": {"r": 16, "lora_alpha": 32, "target_modules": "preset"},
        "data": {"dataset": "identity", "max_length": 256},
        "eval": {"limit": 16, "exact_match": False},
        "train": {
            "max_steps": steps,
            "batch_size": batch,
            "lr": 2e-4,
            "precision": "fp32",
            "progress": "none",
            "tensorboard": False,
            "seed": 0,
            "eval_every": steps,
        },
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "lorakit", "train", str(path), *VARIANTS[name]]
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (folder / name / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    return {
        "variant": name,
        "step_s": statistics.median(r["step_s"] for r in train_rows[1:]),
        "peak_mb": max(r["memory_mb"] for r in train_rows),
        "eval_loss_start": evals[0]["eval_loss"],
        "eval_loss_end": evals[-1]["eval_loss"],
        "train_loss_end": train_rows[-1]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants.split(","):
            results.append(run_variant(name, args.steps, args.batch, args.threads, Path(tmp)))
            print(json.dumps(results[-1]), flush=True)
    print(f"load average after: {os.getloadavg()}")
    print("| variant | s/step | peak MB | eval loss start | eval loss end | train loss end |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['variant']} | {r['step_s']:.2f} | {r['peak_mb']:.0f} | "
            f"{r['eval_loss_start']:.4f} | {r['eval_loss_end']:.4f} | {r['train_loss_end']:.4f} |"
        )


if __name__ == "__main__":
    main()
