"""Forward cost of an unmerged LoRA adapter (r=16 on all 7 projections) over the base model.

Runs the base model, lorakit and peft on the same SmolLM2-135M-shaped Llama (random weights) in
one process, interleaving the three (the order reversed every other round, so a steady drift
hits them alike) and prints the median time of each and the overhead over the base: the median
of the per-round ratios, with their lower and upper quartiles (a round's three runs are
seconds apart, so the machine's slower drifts cancel in them). Usage:

    python benchmarks/bench_forward.py [--layers 30] [--batch 8] [--seq 128] [--repeats 7] \\
        [--dtypes float32,bfloat16]
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


def measure(dtype: torch.dtype, args: argparse.Namespace) -> dict[str, list[float]]:
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
    for round_ in range(args.repeats):
        order = list(models.items())
        for name, model in order if round_ % 2 == 0 else order[::-1]:
            times[name].append(timed(model, ids))
    return times


def overhead(times: dict[str, list[float]], name: str) -> str:
    """Median and quartiles of the per-round cost of `name` over the base, in percent."""
    ratios = [100 * (t / b - 1) for t, b in zip(times[name], times["base"], strict=True)]
    low, mid, high = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return f"{mid:+6.1f}% [{low:+.1f}, {high:+.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated")
    args = parser.parse_args()
    print(
        f"SmolLM2-135M shape, {args.layers} layers, batch {args.batch} x {args.seq}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"{'dtype':<9} {'base s':>7} {'lorakit s':>9} {'peft s':>7}   lorakit cost [quartiles]"
        f"   peft cost [quartiles]"
    )
    for dtype in (getattr(torch, name) for name in args.dtypes.split(",")):
        t = measure(dtype, args)
        m = {name: statistics.median(values) for name, values in t.items()}
        print(
            f"{str(dtype).removeprefix('torch.'):<9} {m['base']:>7.3f} {m['lorakit']:>9.3f} "
            f"{m['peft']:>7.3f}   {overhead(t, 'lorakit'):<24} {overhead(t, 'peft')}"
        )


if __name__ == "__main__":
    main()
