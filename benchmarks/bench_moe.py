"""LoRA on a mixture of experts' fused expert tensors: lorakit against peft's
`target_parameters`, training steps, time and peak memory measured in the same run.

Model: a random Qwen3-MoE from transformers' config class (`--layers` 4, `--experts` 8, 2 per
token, hidden `--hidden` 384, expert width `--hidden`, vocab 2048). Adapter on both sides:
r=8, alpha=16, dropout 0, on q_proj / v_proj and the experts' `gate_up_proj` and `down_proj`.
A step: forward with labels (the model's own loss, so both sides run the same head), backward,
AdamW. Batch `--rows` x `--length` random tokens.

Each side runs in its own subprocess, one after the other, `--repeats` times alternating (so a
change of machine load hits both). In each: one warm-up step, then `--steps` timed steps (the
median is reported); peak memory is Linux's VmHWM from the first timed step on (reset through
/proc/self/clear_refs after the warm-up, once glibc's `malloc_trim` has returned what the
warm-up freed) minus the RSS before it, i.e. what training adds on top
of the loaded model, and the whole process's peak beside it (peft's import is heavier). RSS
deltas depend on what the allocator kept from the warm-up step, so a third, exact measure is
printed too: the bytes autograd saves for backward in one forward (each storage once, the
parameters left out; `torch.autograd.graph.saved_tensors_hooks`), where materialising W + dW
for every expert would show. With `--device cuda`: CUDA max_memory_allocated above the memory
allocated before the first timed step.

    python benchmarks/bench_moe.py                      # CPU, 4 layers, 8 experts
    python benchmarks/bench_moe.py --steps 3 --repeats 1 --json out.json
    python benchmarks/bench_moe.py --device cuda --hidden 1024 --rows 8 --length 512
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch


def build_model(args):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=2048,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        moe_intermediate_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_experts=args.experts,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(args.device)


def wrap(model, side: str):
    settings = dict(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        target_parameters=["gate_up_proj", "down_proj"],
    )
    if side == "peft":
        from peft import LoraConfig, get_peft_model
    else:
        from lorakit import LoraConfig, get_peft_model
    return get_peft_model(model, LoraConfig(**settings))


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak(device: str) -> float:
    """Reset peak tracking; the memory in use now (MiB)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory back to the system: a fair baseline
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS:")


def _peak(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return _status("VmHWM:")


def worker(args) -> dict:
    """One side: build, wrap, warm up, time the steps; a dict of results."""
    torch.set_num_threads(args.threads) if args.threads else None
    model = wrap(build_model(args), args.side)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 2048, (args.rows, args.length), generator=g).to(args.device)

    def step(saved: dict | None = None) -> float:
        if saved is None:
            loss = model(input_ids=ids, labels=ids).loss
        else:  # what autograd keeps for backward: each storage once, parameters left out
            with torch.autograd.graph.saved_tensors_hooks(_recorder(saved), lambda t: t):
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    saved: dict[int, int] = {}
    first = step(saved)  # warm-up (and the optimizer's states allocated)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    before = _reset_peak(args.device)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = _peak(args.device)
    return {
        "side": args.side,
        "trainable": sum(p.numel() for p in params),
        "first_loss": first,
        "step_s": statistics.median(times),
        "peak_above_model_mib": peak - before,
        "peak_mib": peak,
        "saved_mib": sum(n for k, n in saved.items() if k not in weights) / 2**20,
    }


def _recorder(saved: dict[int, int]):
    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    return pack


def run_side(side: str, args) -> dict:
    command = [sys.executable, __file__, "--worker", side, *_passed(args)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{side} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _passed(args) -> list[str]:
    keys = ("layers", "experts", "hidden", "rows", "length", "steps", "device", "threads")
    return [f"--{k}={getattr(args, k)}" for k in keys]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.side = args.worker
        print(json.dumps(worker(args)))
        return
    results: dict[str, list[dict]] = {"lorakit": [], "peft": []}
    for _ in range(args.repeats):
        for side in ("lorakit", "peft"):
            results[side].append(run_side(side, args))
    summary = {}
    for side, runs in results.items():
        summary[side] = {
            "trainable": runs[0]["trainable"],
            "step_s": statistics.median(r["step_s"] for r in runs),
            "peak_above_model_mib": statistics.median(r["peak_above_model_mib"] for r in runs),
            "peak_mib": statistics.median(r["peak_mib"] for r in runs),
            "saved_mib": statistics.median(r["saved_mib"] for r in runs),
        }
    ours, theirs = summary["lorakit"], summary["peft"]
    print(
        f"Qwen3-MoE {args.layers} layers, {args.experts} experts (2 per token), hidden "
        f"{args.hidden}, batch {args.rows}x{args.length}, {args.device}, {args.steps} steps x "
        f"{args.repeats} runs"
    )
    print(
        f"{'side':<8} {'trainable':>10} {'step s':>8} {'peak+ MiB':>10} {'peak MiB':>9} "
        f"{'saved MiB':>10}"
    )
    for side, s in summary.items():
        print(
            f"{side:<8} {s['trainable']:>10,} {s['step_s']:>8.3f} "
            f"{s['peak_above_model_mib']:>10.1f} {s['peak_mib']:>9.1f} {s['saved_mib']:>10.1f}"
        )
    print(
        f"lorakit / peft: time {ours['step_s'] / theirs['step_s']:.2f}x, peak memory above the "
        f"model {ours['peak_above_model_mib'] / theirs['peak_above_model_mib']:.2f}x, whole "
        f"process {ours['peak_mib'] / theirs['peak_mib']:.2f}x, saved for backward "
        f"{ours['saved_mib'] / theirs['saved_mib']:.2f}x"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": results, "summary": summary}, f, indent=2)


if __name__ == "__main__":
    main()
