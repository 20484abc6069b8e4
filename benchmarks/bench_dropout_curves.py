"""Loss curves with LoRA dropout: lorakit's shared masks against peft's per-layer masks.

lorakit draws one dropout mask per input tensor (q, k, v share one; gate, up another), peft one
per layer. This trains both on the built-in model and the built-in arithmetic task from the same
adapter weights, on the same batches, with the same loop (AdamW, Hugging Face's mean loss), and
compares their loss curves against the noise between two peft runs that differ only in their
dropout seed. Usage:

    python benchmarks/bench_dropout_curves.py [--steps 40] [--batch 8] [--dropout 0.1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batches(tokenizer, steps: int, batch: int) -> list[dict[str, torch.Tensor]]:
    """`steps` padded batches of the arithmetic training questions (prompt tokens masked)."""
    from lorakit.data.batches import collate, make_batches
    from lorakit.data.pipeline import DataConfig, build_dataset

    data = build_dataset(DataConfig(dataset="arithmetic", max_length=96), tokenizer)
    plan = make_batches(data.lengths(), batch, seed=0, group_by_length=False)
    out = []
    while len(out) < steps:
        for rows in plan[: steps - len(out)]:
            b = collate(data.samples, rows, data.pad_token_id, packed=False)
            out.append({k: b[k] for k in ("input_ids", "labels", "attention_mask")})
    return out


def train(model, data: list[dict], seed: int) -> list[float]:
    """Losses of one run: AdamW lr 1e-3 on the trainable tensors, one step per batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    model.train()
    torch.manual_seed(seed)  # the dropout masks' stream
    losses = []
    for batch in data:
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dropout", type=float, default=0.1)
    args = parser.parse_args()

    import peft

    import lorakit
    from lorakit.models import load_model, load_tokenizer

    base = load_model("smollm2-135m-instruct", dtype="float32")
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    data = batches(tokenizer, args.steps, args.batch)
    config = dict(r=16, lora_alpha=32, lora_dropout=args.dropout, target_modules=TARGETS)
    torch.manual_seed(0)
    start = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    weights = peft.get_peft_model_state_dict(start)  # one initial adapter for every run

    def make(kind: str):
        if kind == "peft":
            model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
            peft.set_peft_model_state_dict(model, weights)
        else:
            model = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**config))
            lorakit.set_peft_model_state_dict(model, weights)
        return model

    runs = {}
    for name, kind, seed in [
        ("peft seed 1", "peft", 1),
        ("peft seed 2", "peft", 2),
        ("lorakit seed 1", "lorakit", 1),
        ("lorakit seed 2", "lorakit", 2),
    ]:
        t = time.perf_counter()
        runs[name] = train(make(kind), data, seed)
        print(
            f"{name:<15} {time.perf_counter() - t:6.1f} s  first {runs[name][0]:.3f}  "
            f"last 10 mean {statistics.mean(runs[name][-10:]):.3f}",
            flush=True,
        )

    def gap(a: str, b: str) -> float:
        return statistics.mean(abs(x - y) for x, y in zip(runs[a], runs[b], strict=True))

    print(
        f"\nbuilt-in model, arithmetic, batch {args.batch}, {args.steps} steps, r=16 on 7 "
        f"projections, dropout {args.dropout}, fp32, {torch.get_num_threads()} threads"
    )
    print(
        f"mean |loss difference| per step, peft seed 1 vs peft seed 2 (the noise): "
        f"{gap('peft seed 1', 'peft seed 2'):.4f}"
    )
    for ours in ("lorakit seed 1", "lorakit seed 2"):
        for theirs in ("peft seed 1", "peft seed 2"):
            print(f"mean |loss difference| per step, {ours} vs {theirs}: {gap(ours, theirs):.4f}")
    last = {name: statistics.mean(losses[-10:]) for name, losses in runs.items()}
    print("mean loss of the last 10 steps: " + ", ".join(f"{k} {v:.4f}" for k, v in last.items()))


if __name__ == "__main__":
    main()
