"""8-bit AdamW against fp32 AdamW: a LoRA run on the built-in model with each, same data and seed.

    python benchmarks/bench_optim8bit.py                  # 100 steps, batch 4, rows <= 128 tokens
    python benchmarks/bench_optim8bit.py --steps 20 --json results.json
    python benchmarks/bench_optim8bit.py --step-only      # optimizer.step alone, interleaved

Each optimizer trains a fresh LoRA (r=8, alpha 16, dropout 0, all 7 projections) on the built-in
SmolLM2-135M-Instruct (fp32) over the built-in `arithmetic` dataset with lorakit's loop (lr 1e-3,
cosine, 5 warmup steps, fp32). Printed: both loss curves (every 10th step), the largest and mean
absolute loss difference, the optimizer state in bytes (every state tensor, each storage once),
seconds per training step (wall, from the loop's metrics, first step excluded) and the
optimizer step alone (median of 20 calls on the trained adapter's shapes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run(kind: str, steps: int, batch: int, length: int, workdir: Path) -> dict:
    import torch

    from lorakit import LoraConfig, get_peft_model
    from lorakit.data.pipeline import DataConfig, build_dataset
    from lorakit.models import BUILTIN_MODEL, load_model, load_tokenizer
    from lorakit.train import TrainConfig, train
    from lorakit.train.optim import build_optimizer, state_bytes

    tokenizer = load_tokenizer(BUILTIN_MODEL)
    torch.manual_seed(0)
    model = get_peft_model(
        load_model(BUILTIN_MODEL, dtype="float32"),
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS),
    )
    data = build_dataset(DataConfig(dataset="arithmetic", max_length=length), tokenizer)
    config = TrainConfig(
        optimizer=kind,
        max_steps=steps,
        batch_size=batch,
        lr=1e-3,
        warmup_steps=5,
        precision="fp32",
        progress="none",
        tensorboard=False,
        plots=False,
        seed=0,
    )
    result = train(model, tokenizer, data, None, config, workdir / kind)
    rows = [
        json.loads(line) for line in (workdir / kind / "metrics.jsonl").read_text().splitlines()
    ]
    times = [r["step_s"] for r in rows if r.get("kind") == "train"]

    # the optimizer step alone, on the trained adapter's parameters with fixed gradients
    optimizer, params = build_optimizer(model, TrainConfig(lr=1e-3, optimizer=kind))
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    calls = []
    for _ in range(20):
        start = time.perf_counter()
        optimizer.step()
        calls.append(time.perf_counter() - start)
    return {
        "losses": result.losses,
        "state_bytes": state_bytes(optimizer),
        "trainable_values": sum(p.numel() for p in params),
        "s_per_step": statistics.median(times[1:]) if len(times) > 1 else None,
        "optimizer_step_ms": 1000 * statistics.median(calls),
    }


def step_only(repeats: int) -> None:
    """optimizer.step alone on the built-in model's LoRA shapes (r=8, all 7 projections, 30
    layers), the two optimizers called in turn so that both see the same load."""
    import torch

    from lorakit.train.optim8bit import AdamW8bit

    out = {"q": 576, "k": 192, "v": 192, "o": 576, "gate": 1536, "up": 1536, "down": 576}
    inp = {"q": 576, "k": 576, "v": 576, "o": 576, "gate": 576, "up": 576, "down": 1536}
    shapes = [s for _ in range(30) for k in out for s in ((8, inp[k]), (out[k], 8))]
    optimizers = {}
    for kind, make in (
        ("adamw", lambda p: torch.optim.AdamW(p, foreach=True)),
        ("adamw_8bit", AdamW8bit),
    ):
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        optimizers[kind] = make(params)
        optimizers[kind].step()
    times = {kind: [] for kind in optimizers}
    for _ in range(repeats):
        for kind, optimizer in optimizers.items():
            start = time.perf_counter()
            optimizer.step()
            times[kind].append(time.perf_counter() - start)
    values = sum(math.prod(s) for s in shapes)
    for kind, t in times.items():
        print(
            f"{kind:10s} optimizer.step {1000 * statistics.median(t):8.1f} ms median of "
            f"{repeats} ({values} values, {len(shapes)} tensors)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--step-only", action="store_true")
    args = parser.parse_args()
    if args.step_only:
        print(f"load average {Path('/proc/loadavg').read_text().split()[:3]}")
        step_only(10)
        return
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[:3]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("adamw", "adamw_8bit"):
            results[kind] = run(kind, args.steps, args.batch, args.length, Path(tmp))
    with open("/proc/loadavg") as f:
        load_after = f.read().split()[:3]
    fp32, q8 = results["adamw"], results["adamw_8bit"]
    diffs = [abs(a - b) for a, b in zip(fp32["losses"], q8["losses"], strict=True)]
    print(f"load average before {load_before}, after {load_after}; {os.cpu_count()} CPUs")
    print("step   adamw   adamw_8bit")
    for i in range(0, len(diffs), 10):
        print(f"{i + 1:4d}  {fp32['losses'][i]:.4f}  {q8['losses'][i]:.4f}")
    print(f"last  {fp32['losses'][-1]:.4f}  {q8['losses'][-1]:.4f}")
    print(
        f"max |loss difference| {max(diffs):.4f} (step {diffs.index(max(diffs)) + 1}), "
        f"mean {statistics.mean(diffs):.4f}"
    )
    for kind, r in results.items():
        print(
            f"{kind:10s} state {r['state_bytes']:>9d} B for {r['trainable_values']} values, "
            f"{r['s_per_step']:.3f} s/step, optimizer.step {r['optimizer_step_ms']:.2f} ms"
        )
    print(f"state ratio {q8['state_bytes'] / fp32['state_bytes']:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"load": [load_before, load_after], **results}, indent=1))


if __name__ == "__main__":
    main()
