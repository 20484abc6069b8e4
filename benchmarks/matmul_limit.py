"""The machine's matmul limit: GFLOP/s of one large matmul in fp32 and bf16.

    python benchmarks/matmul_limit.py              # 2048x576 @ 576x1536, both dtypes

The shape is a LoRA training step's typical GEMM on the built-in model (8 x 256 tokens by the
hidden size 576 by the MLP width 1536). bench_train.py measures the same in its own run and
reports each engine's tokens/s as a fraction of it.
"""

from __future__ import annotations

import argparse
import time

SHAPE = (2048, 576, 1536)


def matmul_gflops(dtype_name: str, shape: tuple[int, int, int] = SHAPE, seconds: float = 1.0):
    """Best-of-5 GFLOP/s of (m x k) @ (k x n) in `dtype_name` ("fp32" or "bf16")."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(k, n, generator=gen).to(dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(5):
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 5:
            a @ b
            count += 1
        rate = 2 * m * k * n * count / (time.perf_counter() - t0) / 1e9
        best = max(best, rate)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per dtype")
    args = parser.parse_args()
    m, k, n = SHAPE
    for name in ("fp32", "bf16"):
        print(f"{name} {m}x{k} @ {k}x{n}: {matmul_gflops(name, seconds=args.seconds):.0f} GFLOP/s")


if __name__ == "__main__":
    main()
