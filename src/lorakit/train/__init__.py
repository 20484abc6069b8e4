"""Training: the loop (`loop.train`, read top to bottom) and what it stands on.

`setup` is everything a run needs before its first step (the `Run` the loop carries), `config`
holds the loop's typed settings, `plan` the rows each rank takes each step, `optim` AdamW / LoRA+
and the schedules (peft's `create_loraplus_optimizer` is lora.compat's), `optim8bit` AdamW with
8-bit moments (bitsandbytes; `AdamW8bit` is imported on first use), `checkpoint` checkpoints and
exact resume, `rundir` atomic folders and what a new run refuses to write over, `log` metrics and
progress, `runtime` seeds, torchrun, precision, the allocator and stop signals, `fsdp` sharding
the base under torchrun, `threads` fewer CPU threads while other work is busy, `evaluate` loss /
perplexity / exact match / samples, `plots` the run's figures.
"""

from typing import Any

from lorakit.lora.compat.loraplus import create_loraplus_optimizer
from lorakit.train.config import TrainConfig
from lorakit.train.evaluate import eval_loss, generate_samples
from lorakit.train.loop import NonFiniteError, train
from lorakit.train.setup import TrainResult


def __getattr__(name: str) -> Any:
    """`AdamW8bit` on first use: importing bitsandbytes takes seconds."""
    if name != "AdamW8bit":
        raise AttributeError(f"module 'lorakit.train' has no attribute {name!r}")
    from lorakit.train.optim8bit import AdamW8bit

    return AdamW8bit


__all__ = [
    "AdamW8bit",
    "NonFiniteError",
    "TrainConfig",
    "TrainResult",
    "eval_loss",
    "generate_samples",
    "create_loraplus_optimizer",
    "train",
]
