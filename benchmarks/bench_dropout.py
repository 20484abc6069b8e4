"""What LoRA dropout costs a training step: lorakit's shared masks, torch's dropout, peft.

One SmolLM2-135M-shaped Llama (random weights, `--layers` decoder layers), r=16 on all 7
projections, batch 8 x 256 random tokens, fp32, forward + backward + AdamW. Five kinds of step
run interleaved in one process, round after round, so the machine's drifting speed hits them
alike:

- lorakit p=0 / lorakit p=D: lorakit's layers without and with dropout D (one mask per distinct
  input, drawn by `lorakit.lora.shared.keep_mask`, the 1/(1-p) folded into the scaling)
- lorakit, torch dropout: lorakit's layers with the shared mask drawn by torch's own dropout
  (`bernoulli_`, a float mask kept for backward), the form lorakit used before
- peft p=0 / peft p=D: peft's layers on a copy of the same model (a mask per layer)

It prints each kind's median step time and the cost of dropout over the same library's p=0,
as the median of the per-round ratios. Usage:

    python benchmarks/bench_dropout.py [--layers 4] [--rounds 20] [--dropout 0.05] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import peft
import torch
import torch.nn.functional as F
from shapes import TARGETS, smollm2_shape

import lorakit
from lorakit.lora import shared


class _TorchDropout:
    """Stands in for `shared._Masked`: torch's dropout(x), unscaled to match its contract."""

    @staticmethod
    def apply(x: torch.Tensor, rate: float) -> torch.Tensor:
        return F.dropout(x, rate, True) * (1 - rate)


def stepper(model, ids: torch.Tensor):
    """One training step of `model` on `ids` (labels = ids), timed."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> float:
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        shared.clear()
        return time.perf_counter() - start

    return step


def set_rate(model, rate: float) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = smollm2_shape(args.layers)
    ids = torch.randint(0, 49152, (8, 256), generator=torch.Generator().manual_seed(0))

    def config(cls):
        return cls(r=16, lora_alpha=32, lora_dropout=args.dropout, target_modules=TARGETS)

    ours = lorakit.get_peft_model(copy.deepcopy(base), config(lorakit.LoraConfig)).train()
    theirs = peft.get_peft_model(copy.deepcopy(base), config(peft.LoraConfig)).train()
    step_ours, step_theirs = stepper(ours, ids), stepper(theirs, ids)
    masked = shared._Masked

    def kind(model, rate, mask_class, step):
        def run() -> float:
            set_rate(model, rate)
            shared._Masked = mask_class
            try:
                return step()
            finally:
                shared._Masked = masked

        return run

    d = args.dropout
    kinds = {
        "lorakit p=0": kind(ours, 0.0, masked, step_ours),
        f"lorakit p={d}": kind(ours, d, masked, step_ours),
        f"lorakit p={d}, torch dropout": kind(ours, d, _TorchDropout, step_ours),
        "peft p=0": kind(theirs, 0.0, masked, step_theirs),
        f"peft p={d}": kind(theirs, d, masked, step_theirs),
    }
    for run in kinds.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in kinds}
    for _ in range(args.rounds):
        for name, run in kinds.items():
            times[name].append(run())
    print(
        f"SmolLM2-135M shape, {args.layers} layers, fp32, batch 8 x 256, r=16 on 7 projections, "
        f"dropout {d}, {args.rounds} rounds, torch threads {torch.get_num_threads()}, CPU "
        f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}"
    )
    for name, values in times.items():
        print(
            f"{name:<32} {1e3 * statistics.median(values):8.1f} ms a step "
            f"({1e3 * min(values):.0f}-{1e3 * max(values):.0f})"
        )
    names = list(kinds)
    for top, bottom in [
        (names[1], names[0]),
        (names[2], names[0]),
        (names[4], names[3]),
        (names[3], names[0]),
        (names[4], names[1]),
    ]:
        ratios = [t / b for t, b in zip(times[top], times[bottom], strict=True)]
        print(
            f"{top} / {bottom}: {statistics.median(ratios):.3f}x "
            f"(rounds {min(ratios):.2f}-{max(ratios):.2f}x)"
        )


if __name__ == "__main__":
    main()
