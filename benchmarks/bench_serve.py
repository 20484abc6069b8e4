"""Serving throughput: lorakit's engine with 0, 1 and 8 adapters per batch, and peft's mixed batch.

One SmolLM2-135M-shaped Llama (random weights), 8 LoRA adapters (r=16 on all 7 projections).
Each scenario sends the same `--requests` prompts of `--prompt-len` tokens and generates
exactly `--new-tokens` greedy tokens per request (end-of-sequence ignored), and reports
generated tokens per second, prefill included:

- base:    lorakit engine, every request on the base model
- 1 adapter: lorakit engine, every request on adapter a0
- 8 mixed: lorakit engine, request i on adapter a{i % 8}, all in one batch
- 8 mixed, grouped: the same with packing off (the core's one-group-per-adapter rows)
- peft mixed: peft's `generate(..., adapter_names=[...])` on the same model and adapter files

Scenarios are interleaved `--repeats` times; the median tokens/s is printed, and each ratio is
the median of the ratios within a round. Then the decode step alone, against what memory allows:

- decode step: (time for --new-tokens tokens - time for 1 token) / (--new-tokens - 1), so the
  prefill cancels out; for the 8-mixed batch and for a single request (with its time to first
  token, which is prefill plus one step)
- memory-bandwidth limit: the time to read, once, the bytes a decode step must read (the base
  model's weights and the adapters' A and B), at the bandwidth measured in the same run by
  summing one contiguous buffer of that size (before, between and after the decode runs; the
  fastest read counts); a step can be no faster than that. The share printed is limit / step.

Usage:

    python benchmarks/bench_serve.py [--layers 30] [--requests 8] [--prompt-len 64]
        [--new-tokens 32] [--repeats 3] [--dtype float32] [--threads N] [--no-prepack]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import threading
import time
from pathlib import Path

import peft
import torch
from shapes import TARGETS, smollm2_shape

import lorakit
from lorakit.serve import build_state
from lorakit.serve.decode import SamplingParams

ADAPTERS = [f"a{i}" for i in range(8)]


class _NoTokenizer:
    """The engine only decodes text; the benchmark needs token ids alone."""

    eos_token_id = None
    chat_template = None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return ""


def save_adapters(base: torch.nn.Module, root: Path, rank: int) -> dict[str, Path]:
    """Eight random non-zero adapters saved in peft's format."""
    paths = {}
    for seed, name in enumerate(ADAPTERS):
        torch.manual_seed(seed + 1)
        config = lorakit.LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False
        )
        lorakit.get_peft_model(copy.deepcopy(base), config).save_pretrained(root / name)
        paths[name] = root / name
    return paths


def run_engine(
    state, prompts: list[list[int]], adapters: list[str | None], new: int, outputs=None
) -> float:
    """Submit every request at once; seconds until the last one finishes."""
    params = SamplingParams(max_tokens=new, temperature=0)
    left, done, lock = [len(prompts)], threading.Event(), threading.Lock()
    tokens: list[list[int]] = [[] for _ in prompts]

    def sink_for(row: int):
        def sink(event) -> None:
            tokens[row].extend(event.token_ids)
            if event.finish_reason is not None:
                with lock:
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()

        return sink

    start = time.perf_counter()
    for row, (prompt, adapter) in enumerate(zip(prompts, adapters, strict=True)):
        state.engine.submit(prompt, adapter, params, sink_for(row))
    if not done.wait(1800):
        raise TimeoutError("the engine did not finish")
    seconds = time.perf_counter() - start
    if outputs is not None:
        outputs.extend(tokens)
    return seconds


def run_grouped(state, prompts: list[list[int]], adapters: list[str], new: int) -> float:
    """The engine with packed adapters switched off for this run."""
    state.host.packed = False
    try:
        return run_engine(state, prompts, adapters, new)
    finally:
        state.host.packed = True


def run_peft(model, prompts: list[list[int]], adapters: list[str], new: int, outputs=None) -> float:
    """peft's mixed-adapter batch generation over the same prompts (equal lengths, no padding)."""
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    with torch.inference_mode():
        generated = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            adapter_names=adapters,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )
    seconds = time.perf_counter() - start
    if outputs is not None:
        outputs.extend(generated[:, ids.shape[1] :].tolist())
    return seconds


def read_time(nbytes: int, repeats: int = 5) -> float:
    """Seconds to read `nbytes` once at this machine's memory bandwidth: a sum over one
    contiguous fp32 buffer of that size, the fastest of `repeats` (per-tensor reads would add
    thousands of small ops' overhead to the limit and flatter the share)."""
    buffer = torch.ones(nbytes // 4)
    with torch.inference_mode():
        buffer.sum()  # warm-up: pages touched, threads started
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            buffer.sum()
            times.append(time.perf_counter() - start)
    return min(times)


def step_bytes(state) -> list[torch.Tensor]:
    """The tensors one decode step reads: the base weights and every adapter's A and B."""
    model = state.host.forward_model  # the base model with the LoRA layers inside
    seen, out = set(), []
    for param in model.parameters():
        if id(param) not in seen:  # tied embeddings: read once
            seen.add(id(param))
            out.append(param.detach())
    return out


def decode_steps(state, prompts, adapters, new: int, repeats: int) -> tuple[float, float]:
    """(time to first token, seconds per decode step), medians over `repeats` interleaved."""
    first, full = [], []
    for _ in range(repeats):
        first.append(run_engine(state, prompts, adapters, 1))
        full.append(run_engine(state, prompts, adapters, new))
    t1, tn = statistics.median(first), statistics.median(full)
    return t1, (tn - t1) / (new - 1)


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-prepack", action="store_true", help="serve without prepacked weights")
    return parser.parse_args()


def setup(args: argparse.Namespace):
    """The engine's server state and peft's model, both with the same 8 adapter files."""
    base = smollm2_shape(args.layers, getattr(torch, args.dtype))
    root = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    paths = save_adapters(base, root, args.rank)
    state = build_state(
        copy.deepcopy(base),
        _NoTokenizer(),
        base_name="base",
        adapters=paths,
        max_batch=args.requests,
        threads=args.threads,
        prepack=not args.no_prepack,
    )
    state.engine.eos_token_ids = set()  # always generate exactly --new-tokens
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), paths["a0"], adapter_name="a0")
    for name in ADAPTERS[1:]:
        reference.load_adapter(paths[name], adapter_name=name)
    reference.eval()
    return state, reference


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    state, reference = setup(args)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 49152, (args.requests, args.prompt_len), generator=gen).tolist()
    mixed = [ADAPTERS[i % 8] for i in range(args.requests)]
    scenarios = {
        "lorakit base": lambda: run_engine(state, prompts, [None] * len(prompts), args.new_tokens),
        "lorakit 1 adapter": lambda: run_engine(
            state, prompts, ["a0"] * len(prompts), args.new_tokens
        ),
        "lorakit 8 mixed": lambda: run_engine(state, prompts, mixed, args.new_tokens),
        "lorakit 8 grouped": lambda: run_grouped(state, prompts, mixed, args.new_tokens),
        "peft 8 mixed": lambda: run_peft(reference, prompts, mixed, args.new_tokens),
    }
    ours: list[list[int]] = []  # warm-up, and the greedy tokens of both sides compared
    theirs: list[list[int]] = []
    run_engine(state, prompts, mixed, args.new_tokens, ours)
    run_peft(reference, prompts, mixed, args.new_tokens, theirs)
    for scenario in scenarios.values():
        scenario()
    times: dict[str, list[float]] = {name: [] for name in scenarios}
    for _ in range(args.repeats):
        for name, scenario in scenarios.items():
            times[name].append(scenario())

    tokens = args.requests * args.new_tokens
    print(
        f"SmolLM2-135M shape, {args.layers} layers, {args.dtype}, {args.requests} requests x "
        f"{args.prompt_len} prompt tokens -> {args.new_tokens} new tokens, r={args.rank} on 7 "
        f"projections, torch threads {torch.get_num_threads()}, median of {args.repeats}, "
        f"CPU {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, prepacked "
        f"linears {state.host.prepacked.nbytes / 1e9:.3f} GB, fused groups "
        f"{state.host._fused.nbytes / 1e9 if state.host._fused else 0:.3f} GB"
    )
    rate = {name: tokens / statistics.median(t) for name, t in times.items()}
    for name, value in rate.items():
        spread = f"{min(times[name]):.2f}-{max(times[name]):.2f} s"
        print(f"{name:<18} {value:8.1f} tokens/s   ({spread})")
    # ratios from the scenarios of one round (minutes apart at most), then their median: the
    # machine's speed drifts between rounds, and a ratio of medians would mix rounds
    for top, bottom in [
        ("lorakit 8 mixed", "lorakit 1 adapter"),
        ("lorakit 8 mixed", "peft 8 mixed"),
        ("lorakit base", "peft 8 mixed"),
    ]:
        ratios = [b / t for t, b in zip(times[top], times[bottom], strict=True)]
        print(
            f"{top.removeprefix('lorakit ')} / {bottom.removeprefix('lorakit ')}: "
            f"{statistics.median(ratios):.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f}x)"
        )
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    print(f"greedy tokens identical to peft's mixed batch: {same}/{len(ours)} requests")
    report_decode(state, prompts, mixed, args)
    state.engine.shutdown()


def report_decode(state, prompts: list[list[int]], mixed: list[str], args) -> None:
    """Decode step time of the 8-mixed batch and of one request, against the bandwidth limit."""
    size = sum(t.numel() * t.element_size() for t in step_bytes(state))
    reads = [read_time(size)]
    steps = []
    for label, rows, names in [
        (f"{len(prompts)} mixed", prompts, mixed),
        ("1 request", prompts[:1], mixed[:1]),
    ]:
        steps.append((label, *decode_steps(state, rows, names, args.new_tokens, args.repeats)))
        reads.append(read_time(size))
    limit = min(reads)  # the bandwidth drifts: the fastest read (before, between, after) counts
    print(
        f"one decode step reads {size / 1e9:.3f} GB: {1e3 * limit:.1f} ms at the "
        f"{size / limit / 1e9:.1f} GB/s measured (the memory-bandwidth limit; the fastest of "
        f"{len(reads)} reads, the slowest {size / max(reads) / 1e9:.1f} GB/s)"
    )
    for label, first, step in steps:
        print(
            f"{label:<10} decode step {1e3 * step:7.1f} ms ({100 * limit / step:4.1f}% of the "
            f"limit), time to first token {1e3 * first:7.1f} ms"
        )


if __name__ == "__main__":
    main()
