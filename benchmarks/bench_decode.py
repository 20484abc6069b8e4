"""One decode step, fused groups on and off, against the memory-bandwidth limit.

Two servers over copies of one SmolLM2-135M-shaped Llama (random weights, fp32) with the same 8
adapters (r=16 on all 7 projections, saved by `bench_serve.save_adapters`): one decodes with
the layers that read one input fused (`lorakit.lora.fused`, the default), one without. Each
prefills the same 8 prompts (request i on adapter a{i % 8}), then their engines' decode steps
are called directly, alternating between the two servers, `--steps` times; the median step
time of each, the median of the per-pair ratios, whether both produced the same tokens, and
each one's share of the memory-bandwidth limit (as in `bench_serve.py`) are printed. This VM's
memory bandwidth drifts, so the limit is measured before the steps, after every 8 pairs and
after them, and the fastest read counts (the strictest limit). Usage:

    python benchmarks/bench_decode.py [--steps 24] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_serve import ADAPTERS, _NoTokenizer, read_time, save_adapters, step_bytes
from shapes import smollm2_shape

from lorakit.serve import build_state
from lorakit.serve.decode import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = smollm2_shape(30)
    paths = save_adapters(base, Path(tempfile.mkdtemp(prefix="bench_decode_")), 16)
    prompts = torch.randint(0, 49152, (8, 64), generator=torch.Generator().manual_seed(0))
    engines = {}
    for name, fuse in (("fused", True), ("unfused", False)):
        state = build_state(
            copy.deepcopy(base),
            _NoTokenizer(),
            base_name="base",
            adapters=paths,
            max_batch=8,
            threads=args.threads,
        )
        state.engine.shutdown()  # its steps are called here, in this thread
        state.host.fuse = fuse
        for i, prompt in enumerate(prompts.tolist()):
            params = SamplingParams(max_tokens=args.steps + 8, temperature=0)
            state.engine.submit(prompt, ADAPTERS[i % 8], params, lambda event: None)
        engines[name] = state
    times: dict[str, list[float]] = {name: [] for name in engines}
    size = sum(t.numel() * t.element_size() for t in step_bytes(engines["unfused"]))
    reads = [read_time(size)]
    with torch.inference_mode():
        for state in engines.values():
            state.engine._admit()
            for _ in range(3):  # the first step learns the groups
                state.engine._decode_step()
        for i in range(args.steps):
            for name, state in engines.items():
                start = time.perf_counter()
                state.engine._decode_step()
                times[name].append(time.perf_counter() - start)
            if i % 8 == 7:
                reads.append(read_time(size))
    reads.append(read_time(size))
    fused, unfused = engines["fused"], engines["unfused"]
    same = all(
        a.output_ids == b.output_ids
        for a, b in zip(fused.engine._active, unfused.engine._active, strict=True)
    )
    limit = min(reads)
    print(
        f"SmolLM2-135M shape, 30 layers, fp32, 8 requests on 8 adapters (r=16, 7 projections), "
        f"{args.steps} steps each, torch threads {torch.get_num_threads()}, CPU "
        f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}"
    )
    print(
        f"one step reads {size / 1e9:.3f} GB: limit {1e3 * limit:.1f} ms "
        f"({size / limit / 1e9:.1f} GB/s, the fastest of {len(reads)} reads; slowest "
        f"{size / max(reads) / 1e9:.1f} GB/s)"
    )
    for name, state in engines.items():
        step = statistics.median(times[name])
        extra = state.host._fused.nbytes if state.host.fuse else 0
        print(
            f"{name:<8} decode step {1e3 * step:6.1f} ms ({100 * limit / step:4.1f}% of the "
            f"limit); prepacked {(state.host.prepacked.nbytes + extra) / 1e9:.3f} GB"
        )
    ratios = [u / f for f, u in zip(times["fused"], times["unfused"], strict=True)]
    print(
        f"unfused / fused: {statistics.median(ratios):.3f}x "
        f"(pairs {min(ratios):.2f}-{max(ratios):.2f}x); same tokens: {same}"
    )
    for state in engines.values():
        state.engine._fail_active(None)


if __name__ == "__main__":
    main()
