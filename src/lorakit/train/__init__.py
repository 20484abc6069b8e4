"""Training: the loop (`loop.train`, one function read top to bottom) and what it stands on.

`config` holds the loop's typed settings, `plan` the rows each rank takes each step,
`optim` AdamW / LoRA+ and the schedules, `loraplus` peft's LoRA+ optimizer builder, `checkpoint` checkpoints and exact resume, `rundir`
atomic folders and what a new run refuses to write over, `log` metrics and progress, `runtime`
seeds, torchrun, precision, the allocator and stop signals,
`evaluate` loss / perplexity / exact match / samples, `plots` the run's figures.
"""

from lorakit.train.config import TrainConfig
from lorakit.train.evaluate import eval_loss, generate_samples
from lorakit.train.loop import NonFiniteError, TrainResult, train
from lorakit.train.loraplus import create_loraplus_optimizer

__all__ = [
    "NonFiniteError",
    "TrainConfig",
    "TrainResult",
    "eval_loss",
    "generate_samples",
    "create_loraplus_optimizer",
    "train",
]
