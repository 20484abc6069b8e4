"""Forward cost of an unmerged LoRA adapter (r=16 on all 7 projections) over the base model.

Runs the base model, lorakit and peft on the same SmolLM2-135M-shaped Llama (random weights) in
one process, interleaving the three so machine noise hits them alike, and prints the median
time of each and the overhead over the base. Usage:

    python benchmarks/bench_forward.py [--layers 30] [--batch 8] [--seq 128] [--repeats 7] [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import peft
import torch
from shapes import TARGETS, smollm2_shape

import lorakit


def timed(model, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model(input_ids=ids, use_cache=False)
    return time.perf_counter() - start


def measure(dtype: torch.dtype, args: argparse.Namespace) -> dict[str, float]:
    base = smollm2_shape(args.layers, dtype)
    config = dict(r=16, lora_alpha=32, target_modules=TARGETS)
    models = {
        "base": base,
        "lorakit": lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**config)),
        "peft": peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config)),
    }
    for model in models.values():
        model.eval()
    ids = torch.randint(
        0, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)
    )
    times: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():  # warm-up
        timed(model, ids)
    for _ in range(args.repeats):
        for name, model in models.items():
            times[name].append(timed(model, ids))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated")
    args = parser.parse_args()
    print(f"SmolLM2-135M shape, {args.layers} layers, batch {args.batch} x {args.seq}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    print(
        f"{'dtype':<6} {'base s':>8} {'lorakit s':>10} {'peft s':>8} {'lorakit +%':>11} {'peft +%':>8}"
    )
    for dtype in (getattr(torch, name) for name in args.dtypes.split(",")):
        t = measure(dtype, args)
        ours, theirs = t["lorakit"] / t["base"] - 1, t["peft"] / t["base"] - 1
        print(f"{str(dtype).removeprefix('torch.'):<6} {t['base']:>8.3f} {t['lorakit']:>10.3f} "
              f"{t['peft']:>8.3f} {100 * ours:>10.1f}% {100 * theirs:>7.1f}%")  # fmt: skip


if __name__ == "__main__":
    main()
