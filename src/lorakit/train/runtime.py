"""The process around a training run: seeds, torchrun, precision, memory, preflight, stop
signals. (The allocator and OpenMP waiting are set before torch loads: `lorakit.startup`.)"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import resource
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.files import temporary_name


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_seed(seed: int, step: int, rank: int) -> None:
    """Reseed torch for one optimizer step, so dropout masks depend only on (seed, step, rank):
    a resumed run draws exactly what an uninterrupted one would."""
    torch.manual_seed((seed * 1_000_003 + step * 7919 + rank) % 2**63)


@dataclass
class Dist:
    """Where this process sits in a torchrun job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created: bool = False

    @property
    def main(self) -> bool:
        """True on rank 0, the process that logs, evaluates and saves."""
        return self.rank == 0


def is_main_process() -> bool:
    """True unless torchrun started this process as a rank other than 0 (RANK > 0); it reads
    the environment, so it holds before the process group exists."""
    return int(os.environ.get("RANK", "0")) == 0


def init_distributed(device: torch.device, always: bool = False) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU; NCCL for CUDA tensors).

    `always` (fsdp, which needs a group even for one process): a single process outside torchrun
    gets a group of one over an in-memory store."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if (world <= 1 and not always) or not dist.is_available():
        return Dist()
    created = False
    if not dist.is_initialized():
        # CUDA tensors over NCCL; the loop's small CPU tensors (token counts, stop flags) over gloo
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        created = True
    return Dist(
        dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), created
    )


def all_reduce_sum(tensor: torch.Tensor, ctx: Dist) -> torch.Tensor:
    """Sum a tensor over ranks in place (no-op in a single process)."""
    if ctx.world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_grads(params: list[nn.Parameter], ctx: Dist) -> None:
    """Sum gradients over ranks with one flat all-reduce (what DDP does, once per step)."""
    if ctx.world_size <= 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]), ctx)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).clone()
        offset += n


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda (this rank's GPU) when available, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device='cuda' but CUDA is not available; use device='cpu'")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (AVX512-BF16 or AMX); without it torch's
    bf16 matmuls fall back to kernels ~10x slower than fp32 (measured on an AVX2 machine)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 where it is fast (CUDA with bf16, CPUs with native bf16), fp16 on older
    GPUs, fp32 otherwise; any other value is returned as given."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for bf16/fp16 mixed precision, or a null context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> int:
    """Store frozen floating-point weight matrices in `dtype`, so autocast has nothing to cast
    per step; trainable parameters and 1-d ones (norms, biases) stay as they are. Returns how
    many were cast."""
    count = 0
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.ndim >= 2 and p.dtype != dtype:
            p.data = p.data.to(dtype)
            count += 1
    return count


def reset_peak_memory(device: torch.device) -> None:
    """Start peak-memory tracking afresh (CUDA stats, or Linux's VmHWM via clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since the last reset: CUDA max allocated, or peak RSS (VmHWM) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def release_memory(device: torch.device) -> None:
    """Hand memory freed by Python objects back to the system (tcmalloc's or glibc's caches,
    CUDA's cache), so that a peak measured next counts what the next job holds, not what an
    earlier job in this process left cached."""
    import ctypes
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    libc = ctypes.CDLL(None)
    for symbol in ("MallocExtension_ReleaseFreeMemory", "malloc_trim"):  # tcmalloc, glibc
        release = getattr(libc, symbol, None)
        if release is not None:
            release(*([0] if symbol == "malloc_trim" else []))


def check_output_dir(path: Path, need_bytes: int) -> None:
    """Fail before training when `path` cannot be created, written or has too little space."""
    import shutil

    probe = path / temporary_name("write-test")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        space = err.errno == errno.ENOSPC
        fix = "free some space" if space else "choose another directory or fix its permissions"
        raise ConfigError(
            f"output_dir {path} is not writable ({err.strerror or err}); {fix}"
        ) from err
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise ConfigError(
            f"output_dir {path} has {free / 2**20:.0f} MiB free; checkpoints need about "
            f"{need_bytes / 2**20:.0f} MiB; free space or lower keep_checkpoints"
        )


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A second stop signal: the run stopped at once, without checkpointing the step it was on."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by a second {signal.Signals(signum).name}")
        self.signum = signum


def install_stop_signals() -> tuple[dict[str, int], dict]:
    """Turn SIGINT (Ctrl-C) and SIGTERM (kill, docker stop, schedulers) into a flag the loop
    checks after each step, so the run checkpoints the step it is on and stops; a second signal
    raises Interrupted at once. Returns (flag {'signal': number or 0}, the old handlers)."""
    flag = {"signal": 0}

    def handler(signum, frame):  # noqa: ARG001
        if flag["signal"]:
            raise Interrupted(signum)
        flag["signal"] = signum

    old = {}
    for signum in STOP_SIGNALS:
        try:
            old[signum] = signal.signal(signum, handler)
        except ValueError:  # not the main thread: signals keep their default behaviour
            break
    return flag, old


def restore_signals(old: dict) -> None:
    """Put back the handlers `install_stop_signals` replaced."""
    for signum, handler in old.items():
        signal.signal(signum, handler)
