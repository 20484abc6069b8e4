"""Quantized base layers: forward cost vs nn.Linear, round-trip error, storage, model memory.

    python benchmarks/bench_quant.py            # everything (the model part loads the 135M model)
    python benchmarks/bench_quant.py --layers   # layer timings, error and storage only

Timings are the minimum over repeats, which is the most stable statistic on a shared machine.
The model memory of each precision is measured in a fresh subprocess: the exact bytes of its
parameters and buffers, and the process's resident set size (VmRSS) after loading.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import subprocess
import sys
import time

import torch
from torch import nn

from lorakit.quant import QuantLinear, model_nbytes

# The SmolLM2-135M projection shapes (in, out): q/o, k/v, gate/up, down.
SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
TOKENS = [1, 128, 1024]
PRECISIONS = {  # name -> (load dtype, quantization)
    "fp32": ("float32", None),
    "bf16": ("bfloat16", None),
    "int8 (fp32 rest)": ("float32", "int8"),
    "nf4 (fp32 rest)": ("float32", "nf4"),
    "int8 (bf16 rest)": ("bfloat16", "int8"),
    "nf4 (bf16 rest)": ("bfloat16", "nf4"),
}


def best_ms(fn, *args, repeats: int) -> float:
    """Minimum wall time of `fn(*args)` over `repeats` runs, in milliseconds (after a warm-up)."""
    fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


@torch.no_grad()
def layer_timings(dtype: torch.dtype, repeats: int) -> None:
    """Forward time of nn.Linear vs QuantLinear (nf4 + double quant, int8) per shape and batch."""
    print(
        f"\n### Layer forward, compute dtype {str(dtype).removeprefix('torch.')} "
        f"(ms, best of {repeats})\n"
    )
    print(
        "| in -> out | tokens | nn.Linear | nf4 | nf4 / Linear "
        "| int8 | int8 / Linear | nf4 dequantize |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for inp, out in SHAPES:
        linear = nn.Linear(inp, out, bias=False, dtype=dtype)
        nf4 = QuantLinear.from_linear(linear, "nf4", double_quant=True, compute_dtype=dtype)
        int8 = QuantLinear.from_linear(linear, "int8", compute_dtype=dtype)
        dequant = best_ms(nf4.dequantize, repeats=repeats)
        for tokens in TOKENS:
            x = torch.randn(tokens, inp, dtype=dtype)
            base = best_ms(linear, x, repeats=repeats)
            t_nf4 = best_ms(nf4, x, repeats=repeats)
            t_int8 = best_ms(int8, x, repeats=repeats)
            print(
                f"| {inp} -> {out} | {tokens} | {base:.3f} | {t_nf4:.3f} | {t_nf4 / base:.2f} "
                f"| {t_int8:.3f} | {t_int8 / base:.2f} | {dequant:.3f} |"
            )


def error_and_storage() -> None:
    """Round-trip error on N(0, 1) weights and measured bits per weight, per method."""
    weight = torch.randn(1024, 4096)
    print("\n### Round trip on a 1024 x 4096 N(0, 1) weight\n")
    print("| method | rms error | max error | bits / weight | bytes |")
    print("|---|---|---|---|---|")
    for method, dq in [
        ("int8", False),
        ("nf4", True),
        ("nf4", False),
        ("fp4", True),
        ("fp4", False),
    ]:
        layer = QuantLinear.from_weight(weight, method=method, double_quant=dq)
        error = layer.dequantize(torch.float32) - weight
        name = f"{method}{' + double quant' if dq else ''}"
        print(
            f"| {name} | {error.pow(2).mean().sqrt():.4f} | {error.abs().max():.4f} "
            f"| {layer.bits_per_parameter():.4f} | {layer.storage_bytes()} |"
        )


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def measure_one(name: str, repeats: int) -> dict:
    """Load the built-in model in one precision; its bytes, RSS and (repeats > 0) forward time."""
    from lorakit.models import load_model

    dtype, quantization = PRECISIONS[name]
    rss_before = _rss_bytes()
    model = load_model("smollm2-135m-instruct", dtype=dtype, quantization=quantization).eval()
    gc.collect()
    with contextlib.suppress(OSError):  # return freed fp32 weights to the OS: RSS = what is kept
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    ids = torch.randint(0, 49152, (1, 128))
    with torch.no_grad():
        forward = best_ms(model, ids, repeats=repeats) if repeats else float("nan")
    return {
        "name": name,
        "model_bytes": model_nbytes(model),
        "rss_growth": _rss_bytes() - rss_before,
        "forward_ms": forward,
    }


def model_memory(repeats: int, threads: int) -> None:
    """The 135M model's size in each precision, each in a fresh process."""
    print(f"\n### SmolLM2-135M size; forward of 1 x 128 tokens (ms, best of {repeats})\n")
    print("| precision | parameters + buffers (MB) | RSS growth after load (MB) | forward (ms) |")
    print("|---|---|---|---|")
    for name in PRECISIONS:
        command = [sys.executable, __file__, "--one", name, "--model-repeats", str(repeats)]
        command += ["--threads", str(threads)]
        result = json.loads(
            subprocess.run(command, check=True, capture_output=True, text=True).stdout
        )
        print(
            f"| {name} | {result['model_bytes'] / 1e6:.1f} | {result['rss_growth'] / 1e6:.1f} "
            f"| {result['forward_ms']:.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", action="store_true", help="skip the 135M model part")
    parser.add_argument(
        "--model-repeats", type=int, default=2, help="135M forward timings (0: memory only)"
    )
    parser.add_argument("--bf16", action="store_true", help="also time layers in bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.one:
        print(json.dumps(measure_one(args.one, args.model_repeats)))
        return
    print(f"torch {torch.__version__}, {args.threads} threads")
    layer_timings(torch.float32, args.repeats)
    if args.bf16:
        layer_timings(torch.bfloat16, args.repeats)
    error_and_storage()
    if not args.layers:
        model_memory(args.model_repeats, args.threads)


if __name__ == "__main__":
    main()
