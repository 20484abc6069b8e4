"""Training throughput and peak memory: lorakit's loop against peft + transformers.

Same base model, same data, same LoRA config (`--adapter`: r=16 on all 7 projections, or r=8
on q,v; alpha = 2r; `--dropout`, 0 by default), batch 8 x 256, AdamW, one optimizer step per
batch. Each configuration runs in its own subprocess. `--engines`: lorakit, lorakit+compile
(train.compile: true), peft+default (the default allocator), peft+tcmalloc (tcmalloc preloaded,
LD_PRELOAD) and peft+compile (tcmalloc, each decoder layer compiled with torch.compile,
dynamic shapes: PyTorch's regional-compilation recipe); lorakit's worker calls
`preload_tcmalloc()` at startup, as the CLI does. `first s` is the first step's time (with
compile: tracing and code generation).

The same run measures the machine's matmul limit (benchmarks/matmul_limit.py: 2048x576 @
576x1536 in fp32 and bf16) and prints each engine's tokens/s x FLOPs per token as a fraction
of the limit of its precision (FLOPs per token: `flops_per_token`).

    python benchmarks/bench_train.py                       # built-in 135M model + tiny model
    python benchmarks/bench_train.py --models tiny --steps 5
    python benchmarks/bench_train.py --json results.json
    python benchmarks/bench_train.py --models builtin --cases fixed-fp32,variable-fp32 \
        --dropout 0.05 --adapter all-r16,qv-r8
    python benchmarks/bench_train.py --interleaved --models builtin --cases fixed-fp32 --rows 2
    python benchmarks/bench_train.py --contention 2 --models builtin --cases fixed-fp32 \
        --omp-policy unset,lorakit,passive --threads default,1

`--contention N` measures how a shared CPU slows lorakit's step: for each OpenMP setting
(`--omp-policy` x `--threads`) lorakit's worker runs once on its own, then again beside N busy
processes (pure-Python loops, started before the worker and killed after it), and the ratio of
the two step times is printed; peft is not run. `--omp-policy`: `lorakit` (the variables the CLI
sets, startup.WAIT_POLICY), `unset` (libgomp's defaults: a waiting thread spins ~3 ms), `passive`,
`active`, or a number (GOMP_SPINCOUNT); `--threads`: OMP_NUM_THREADS, `default` for torch's own
choice. Without --contention every worker runs with the first value of each.

Data: random token ids (throughput does not depend on the text). Every sample's first quarter
is prompt (label -100). Fixed-length: 8 rows of 256 tokens. Variable-length: sample lengths
uniform in 32..256; lorakit packs them into rows of 256 (lorakit.data.batches), peft pads each
batch of 8 samples to its longest. tokens/s counts real (non-padding) tokens; peak memory is the
peak RSS from the first training step on (Linux VmHWM, reset after setup).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import contention  # benchmarks/contention.py: the --contention mode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {"all-r16": (16, TARGETS), "qv-r8": (8, ["q_proj", "v_proj"])}  # rank, targets
BATCH, LENGTH = 8, 256


# ----------------------------------------------------------------------------- worker side
def build_model(name: str):
    """The base model: the built-in SmolLM2-135M-Instruct, or a tiny Llama of the same kind."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if name == "builtin":
        from lorakit.models import ensure_builtin_model

        return AutoModelForCausalLM.from_pretrained(ensure_builtin_model(), dtype=torch.float32)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def make_samples(vocab: int, variable: bool, count: int):
    """Samples (input_ids, labels) with the first quarter of each masked as prompt."""
    import numpy as np

    from lorakit.data.pipeline import Sample

    rng = np.random.default_rng(0)
    samples = []
    for i in range(count):
        n = int(rng.integers(32, LENGTH + 1)) if variable else LENGTH
        ids = rng.integers(0, vocab, n).tolist()
        labels = [-100] * (n // 4) + ids[n // 4 :]
        samples.append(Sample(ids, labels, f"sample {i}"))
    return samples


def make_batches(vocab: int, variable: bool, packed: bool, n_batches: int) -> list[dict]:
    """Collated batches: fixed rows, packed rows (lorakit) or padded rows (peft)."""
    from lorakit.data.batches import collate
    from lorakit.data.batches import make_batches as plan

    samples = make_samples(vocab, variable, 40 * n_batches if variable else BATCH * n_batches)
    lengths = [len(s.input_ids) for s in samples]
    rows = plan(
        lengths, BATCH, packing=packed, max_length=LENGTH, group_by_length=False, shuffle=False
    )
    batches = [collate(samples, r, 0, packed) for r in rows[:n_batches]]
    for b in batches:
        b.pop("sample_ids")
        if not variable:  # fixed length: no padding anywhere, no mask needed
            b["attention_mask"] = None
    return batches


def real_tokens(batch: dict) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int((batch["labels"] != -200).numel())


def run_lorakit(args, model, batches) -> dict:
    from lorakit import LoraConfig, get_peft_model
    from lorakit.train import TrainConfig, train

    r, targets = ADAPTERS[args.adapter]
    lora = get_peft_model(
        model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=args.dropout, target_modules=targets)
    )
    config = TrainConfig(
        precision=args.precision,
        max_steps=len(batches),
        shuffle=False,
        plots=False,
        lr=1e-4,
        scheduler="constant",
        progress="none",
        tensorboard=False,
        device="cpu",
        compile=args.engine.endswith("+compile"),
    )
    with tempfile.TemporaryDirectory() as out:
        result = train(lora, None, batches, None, config, out)
    history = [r for r in result.history if r["kind"] == "train"]
    rows = history[args.warmup :]
    return {
        "first_s": history[0]["step_s"],
        "tokens_per_s": sum(r["tokens"] for r in rows) / sum(r["step_s"] for r in rows),
        "step_s": statistics.median(r["step_s"] for r in rows),
        "cpu_s": statistics.median(r["cpu_s"] for r in rows),
        "peak_mb": max(r["memory_mb"] for r in rows),
        "step_threads": [r["threads"] for r in result.history if r["kind"] == "train"],
    }


def run_peft(args, model, batches) -> dict:
    import peft
    import torch

    from lorakit.train.runtime import peak_memory_mb, reset_peak_memory

    r, targets = ADAPTERS[args.adapter]
    config = peft.LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=args.dropout, target_modules=targets
    )
    model = peft.get_peft_model(model, config)
    model.train()
    if args.engine.endswith("+compile"):  # regional: each decoder layer (PyTorch's recipe)
        names = set(model.get_base_model()._no_split_modules)
        for module in model.modules():
            if type(module).__name__ in names:
                module.compile(dynamic=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    device = torch.device("cpu")
    reset_peak_memory(device)
    times, cpus, tokens = [], [], []
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if v is not None}
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = model(**inputs, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        tokens.append(real_tokens(batch))
    first = times[0]
    times, tokens = times[args.warmup :], tokens[args.warmup :]
    return {
        "first_s": first,
        "tokens_per_s": sum(tokens) / sum(times),
        "step_s": statistics.median(times),
        "cpu_s": statistics.median(cpus[args.warmup :]),
        "peak_mb": peak_memory_mb(device),
    }


def flops_per_token(model, length: int) -> float:
    """FLOPs of one training token of a LoRA step: 4 x the base's matmul weights (forward, and
    backward to the inputs; the frozen weights get no gradient; the adapters' own cost is left
    out) plus attention's two products, forward and backward (12 x layers x length x hidden)."""
    from torch import nn

    seen, weights = set(), 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            weights += module.weight.numel()
    head = model.get_output_embeddings()
    if id(head.weight) not in seen:
        weights += head.weight.numel()
    cfg = model.config
    return 4 * weights + 12 * cfg.num_hidden_layers * length * cfg.hidden_size


def worker(args) -> None:
    if args.engine.startswith("lorakit"):
        from lorakit.startup import reexec_for_speed

        reexec_for_speed()  # what the CLI does at startup (re-execs with tcmalloc when found)
    import torch

    from lorakit.startup import tcmalloc_loaded

    model = build_model(args.model)
    variable = args.data == "variable"
    batches = make_batches(
        model.config.vocab_size,
        variable,
        args.engine.startswith("lorakit") and variable,
        args.steps + args.warmup,
    )
    flops = flops_per_token(model, LENGTH)
    run = run_lorakit if args.engine.startswith("lorakit") else run_peft
    out = run(args, model, batches)
    out["flops_per_token"] = flops
    out["tcmalloc"] = tcmalloc_loaded()
    out["threads"] = torch.get_num_threads()
    out["openmp"] = {k: os.environ[k] for k in contention.OPENMP_VARS[:2] if k in os.environ}
    print("RESULT " + json.dumps(out), flush=True)


def interleaved(args) -> None:
    """lorakit and peft in one process, steps alternating, so both see the same machine load:
    the fairer comparison on a shared machine (one allocator for both, though)."""
    import copy

    import peft
    import torch

    from lorakit import LoraConfig, get_peft_model
    from lorakit.ops import causal_lm_loss
    from lorakit.train.runtime import autocast

    base = build_model(args.models.split(",")[0])
    twin = copy.deepcopy(base)
    batch = make_batches(base.config.vocab_size, False, False, 1)[0]
    batch = {k: v[: args.rows] for k, v in batch.items() if v is not None}
    r, targets = ADAPTERS[args.adapter.split(",")[0]]
    common = {"r": r, "lora_alpha": 2 * r, "lora_dropout": args.dropout, "target_modules": targets}
    ours = get_peft_model(base, LoraConfig(**common))
    theirs = peft.get_peft_model(twin, peft.LoraConfig(**common))
    ours.train()
    theirs.train()  # dropout draws only in training mode
    precision = args.cases.split(",")[0].split("-")[1]

    def lorakit_step() -> None:
        with autocast(precision, torch.device("cpu")):
            loss_sum, n = causal_lm_loss(ours, batch)
        (loss_sum / n).backward()

    def peft_step() -> None:
        with autocast(precision, torch.device("cpu")):
            loss = theirs(**batch, use_cache=False).loss
        loss.backward()

    cpu: dict[str, list[float]] = {"lorakit": [], "peft": []}
    for _ in range(args.warmup + args.steps):
        for name, step in (("lorakit", lorakit_step), ("peft", peft_step)):
            c0 = time.process_time()
            step()
            cpu[name].append(time.process_time() - c0)
    tokens = batch["input_ids"].numel()
    med = {k: statistics.median(v[args.warmup :]) for k, v in cpu.items()}
    for name, value in med.items():
        print(f"{name:8} forward+backward {value:6.2f} cpu-s ({tokens / value:.0f} tokens/cpu-s)")
    print(f"lorakit / peft: {med['peft'] / med['lorakit']:.2f}x tokens per CPU-second")


# ----------------------------------------------------------------------------- driver side
# engine name -> (worker engine, allocator)
ENGINES = {
    "lorakit": ("lorakit", "auto"),
    "lorakit+compile": ("lorakit+compile", "auto"),
    "peft+default": ("peft", "default"),
    "peft+tcmalloc": ("peft", "tcmalloc"),
    "peft+compile": ("peft+compile", "tcmalloc"),
}


def bench_case(args, model: str, adapter: str, case: str, engines: list[str], limit) -> dict:
    """One model x adapter x case over the engines: a table row each, then lorakit's ratios to
    the fastest peft engine; `limit`: the matmul GFLOP/s per precision."""
    one = argparse.Namespace(**{**vars(args), "adapter": adapter})
    data, precision = case.split("-")
    row = {"model": model, "adapter": adapter, "dropout": args.dropout, "case": case}
    for name in engines:
        engine, allocator = ENGINES[name]
        out = run_config(model, engine, precision, data, allocator, one)
        row[name] = out
        if "error" in out:
            print(f"{model:8} {adapter:8} {case:14} {name:16} error: {out['error']}")
            continue
        # CPU seconds are the steadier measure on a shared machine
        out["tokens_per_cpu_s"] = out["tokens_per_s"] * out["step_s"] / out["cpu_s"]
        gflops = out["tokens_per_s"] * out["flops_per_token"] / 1e9
        out["limit_fraction"] = gflops / limit[precision]
        print(
            f"{model:8} {adapter:8} {case:14} {name:16} {out['tokens_per_s']:7.0f} "
            f"{out['step_s']:7.2f} {out['cpu_s']:10.2f} {out['tokens_per_cpu_s']:9.0f} "
            f"{out['peak_mb']:8.0f} {out['first_s']:8.1f} {out['limit_fraction']:8.0%}",
            flush=True,
        )
    peft_rows = [row[n] for n in engines if n.startswith("peft") and "error" not in row[n]]
    for ours in (n for n in engines if n.startswith("lorakit") and "error" not in row[n]):
        if not peft_rows:
            break
        lk = row[ours]
        best = max(peft_rows, key=lambda r: r["tokens_per_s"])
        best_name = next(n for n in engines if row.get(n) is best)
        ratio = {
            "speed": lk["tokens_per_s"] / best["tokens_per_s"],
            "cpu": lk["tokens_per_cpu_s"] / best["tokens_per_cpu_s"],
            "memory": lk["peak_mb"] / best["peak_mb"],
        }
        row[f"{ours}/peft"] = {"against": best_name, **ratio}
        print(
            f"{'':8} {adapter:8} {case:14} {ours} / {best_name}: {ratio['speed']:.2f}x tokens/s, "
            f"{ratio['cpu']:.2f}x tokens/cpu-s, {ratio['memory']:.2f}x peak memory",
            flush=True,
        )
    return row


def run_config(
    model: str,
    engine: str,
    precision: str,
    data: str,
    allocator: str,
    args,
    openmp: dict[str, str] | None = None,
) -> dict:
    """One configuration in a fresh subprocess; `openmp` defaults to the first --omp-policy and
    --threads values."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", *contention.OPENMP_VARS)}
    if openmp is None:
        openmp = contention.openmp_env(args.omp_policy.split(",")[0], args.threads.split(",")[0])
    env.update(openmp)
    if allocator == "tcmalloc":
        from lorakit.startup import find_tcmalloc

        lib = find_tcmalloc()
        if lib is None:
            return {"error": "libtcmalloc_minimal not installed"}
        env["LD_PRELOAD"] = lib
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--model",
        model,
        "--engine",
        engine,
        "--precision",
        precision,
        "--data",
        data,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--dropout",
        str(args.dropout),
        "--adapter",
        args.adapter,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no result"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,builtin", help="comma list: tiny, builtin")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    parser.add_argument(
        "--cases",
        default="fixed-bf16,fixed-fp32,variable-bf16",
        help="comma list of <fixed|variable>-<bf16|fp32>",
    )
    parser.add_argument("--dropout", type=float, default=0.0, help="lora_dropout of both engines")
    parser.add_argument(
        "--adapter",
        default="all-r16",
        help="comma list of " + ", ".join(ADAPTERS) + " (rank and target modules)",
    )
    parser.add_argument(
        "--engines",
        default="lorakit,peft+default,peft+tcmalloc",
        help="comma list of " + ", ".join(ENGINES),
    )
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument(
        "--interleaved",
        action="store_true",
        help="one process, lorakit and peft steps alternating (first model/case)",
    )
    parser.add_argument("--rows", type=int, default=BATCH, help="rows per batch (--interleaved)")
    parser.add_argument(
        "--contention",
        type=int,
        default=0,
        metavar="N",
        help="lorakit's step quietly and beside N busy processes (no peft)",
    )
    parser.add_argument(
        "--omp-policy",
        default="lorakit",
        help="comma list of lorakit, unset, passive, active or a GOMP_SPINCOUNT",
    )
    parser.add_argument(
        "--threads", default="default", help="comma list of OMP_NUM_THREADS values, or default"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    adapters = args.adapter.split(",")
    unknown = [a for a in adapters if a not in ADAPTERS]
    if unknown:
        parser.error(f"--adapter {','.join(unknown)}: expected one of {', '.join(ADAPTERS)}")
    if args.interleaved:
        interleaved(args)
        return
    try:
        for policy, threads in contention.openmp_settings(args):
            contention.openmp_env(policy, threads)
    except ValueError as error:
        parser.error(str(error))
    if args.contention:
        one = argparse.Namespace(**{**vars(args), "adapter": adapters[0]})
        results = contention.run(one, run_config, (BATCH, LENGTH))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return
    import torch
    from matmul_limit import SHAPE, matmul_gflops  # benchmarks/matmul_limit.py

    print(
        f"batch {BATCH} x {LENGTH}, lora_dropout {args.dropout}, {args.steps} timed steps after "
        f"{args.warmup} warmup, {os.cpu_count()} CPUs "
        f"({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    limit = {name: matmul_gflops(name) for name in ("fp32", "bf16")}
    print(
        f"matmul limit ({SHAPE[0]}x{SHAPE[1]} @ {SHAPE[1]}x{SHAPE[2]}, this run): "
        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in limit.items())
    )
    engines = args.engines.split(",")
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        parser.error(f"--engines {','.join(unknown)}: expected some of {', '.join(ENGINES)}")
    print(
        f"{'model':8} {'adapter':8} {'case':14} {'engine':16} {'tok/s':>7} {'s/step':>7} "
        f"{'cpu-s/step':>10} {'tok/cpu-s':>9} {'peak MB':>8} {'first s':>8} {'of limit':>8}"
    )
    results = [
        bench_case(args, model, adapter, case, engines, limit)
        for model, adapter, case in itertools.product(
            args.models.split(","), adapters, args.cases.split(",")
        )
    ]
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
