"""Where a training step's time goes: torch profiler's per-op table of one lorakit step.

    python benchmarks/profile_step.py                     # built-in model, bf16, dropout 0.05
    python benchmarks/profile_step.py --precision fp32 --rows 8 --top 25

The step is bench_train.py's (batch 8 x 256, r=16 on all 7 projections, AdamW): one untimed
step, then one under the profiler; the table is sorted by self CPU time, with each op's share
of the profiled step, and the matmul ops' share summed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin", help="builtin or tiny")
    parser.add_argument("--precision", default="bf16", help="fp32 or bf16")
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="train.compile: true")
    parser.add_argument("--static", action="store_true", help="with --compile: static shapes")
    args = parser.parse_args()

    import torch
    from bench_train import ADAPTERS, build_model, make_batches
    from torch.profiler import ProfilerActivity, profile

    from lorakit import LoraConfig, get_peft_model
    from lorakit.ops import causal_lm_loss
    from lorakit.train import compiled as compiled_module
    from lorakit.train.compiled import Compiled
    from lorakit.train.runtime import autocast, cast_frozen

    model = build_model(args.model)
    batch = make_batches(model.config.vocab_size, False, False, 1)[0]
    batch = {k: v[: args.rows] for k, v in batch.items() if v is not None}
    r, targets = ADAPTERS["all-r16"]
    lora = get_peft_model(
        model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=args.dropout, target_modules=targets)
    )
    if args.precision == "bf16":
        cast_frozen(lora, torch.bfloat16)  # what train() does for bf16 (base_dtype auto)
    lora.train()
    params = [p for p in lora.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    compiled_module.DYNAMIC = not args.static
    compiled = Compiled(lora) if args.compile else None
    device = torch.device("cpu")

    def step() -> None:
        with (
            autocast(args.precision, device),
            compiled.active() if compiled else contextlib.nullcontext(),
        ):
            loss, n = causal_lm_loss(lora, batch)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()
    print(f"first step {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    step()
    print(f"second step {time.perf_counter() - t0:.2f} s (unprofiled)")
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.top]
    print(
        f"{args.model}, {args.precision}, dropout {args.dropout}, {args.rows} x 256, "
        f"compile {args.compile}: profiled step {wall:.2f} s (profiler overhead included)"
    )
    print("| op | calls | self CPU ms | share |\n|---|---|---|---|")
    for e in rows:
        ms = e.self_cpu_time_total / 1e3
        print(f"| {e.key} | {e.count} | {ms:.0f} | {e.self_cpu_time_total / total:.1%} |")
    mm = sum(e.self_cpu_time_total for e in events if e.key in MATMULS)
    print(f"matmul ops ({', '.join(MATMULS)}): {mm / total:.1%} of self CPU time")


if __name__ == "__main__":
    main()
