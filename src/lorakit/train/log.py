"""What a run reports: metrics.jsonl, TensorBoard events (when installed), a progress bar on a
terminal and plain log lines elsewhere. Used on rank 0 only."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from lorakit.files import write_text
from lorakit.train.config import TrainConfig

LEGEND = (
    "tok/s: input tokens of the step (prompts and responses; padding not counted, except a "
    "packed row's tail) per second; "
    "eta: the steps left at this run's mean step time"
)


def read_metrics(path: Path, up_to_step: int | None = None) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl, keeping only those at or before `up_to_step` when given."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut off by a crash
            continue
        if up_to_step is None or row.get("step", 0) <= up_to_step:
            rows.append(row)
    return rows


class RunLog:
    """Appends metric rows to metrics.jsonl and TensorBoard, and shows progress."""

    def __init__(
        self, output_dir: Path, config: TrainConfig, *, total_steps: int, start_step: int
    ) -> None:
        """Rows after `start_step` (left by an interrupted run; all of them when the run starts
        afresh) are dropped; config.progress and config.tensorboard say how the run is shown."""
        self.path = output_dir / "metrics.jsonl"
        self.rows = read_metrics(self.path, up_to_step=start_step) if start_step else []
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
        self.total, self.start, self.t0 = total_steps, start_step, time.perf_counter()
        self.writer = None
        if config.tensorboard:
            self.writer = _tensorboard_writer(output_dir / "tensorboard")
        mode = config.progress
        if mode == "auto":
            mode = "rich" if sys.stderr.isatty() else "plain"
        self.mode, self.bar, self.task = mode, None, None
        if mode == "rich":
            self._start_rich()
        self.message(LEGEND)

    def _start_rich(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.bar = Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta {task.fields[eta]}"),
            console=Console(stderr=True),
        )
        self.bar.start()
        self.task = self.bar.add_task(
            "train", total=self.total, completed=self.start, info="", eta="-"
        )

    def eta(self, step: int) -> float | None:
        """Seconds left at this run's mean step time so far (None before the first step)."""
        done = step - self.start
        if done <= 0:
            return None
        return (self.total - step) * (time.perf_counter() - self.t0) / done

    def log(self, row: dict[str, Any], show: bool = True) -> None:
        """Record one row (train or eval); `show` prints/updates progress for it."""
        self.rows.append(row)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key not in ("step", "kind", "epoch") and isinstance(value, int | float):
                    self.writer.add_scalar(f"{row.get('kind', 'train')}/{key}", value, row["step"])
        if show:
            self._show(row)
        elif self.mode == "rich" and self.bar is not None:  # the bar and eta move every step
            self.bar.update(self.task, completed=row["step"], eta=_clock(self.eta(row["step"])))

    def _show(self, row: dict[str, Any]) -> None:
        if row.get("kind") == "eval":
            text = f"step {row['step']}: eval_loss {row['eval_loss']:.4f}"
            if "perplexity" in row:
                text += f" ppl {row['perplexity']:.2f}"
            if "eval_rewards/accuracies" in row:  # preference tuning
                text += (
                    f" reward accuracy {row['eval_rewards/accuracies']:.0%} margin "
                    f"{row['eval_rewards/margins']:.3f}"
                )
        else:
            text = f"loss {row['loss']:.4f} lr {row['lr']:.2e} {row['tokens_per_s']:.0f} tok/s"
            if "rewards/accuracies" in row:
                text += f" reward accuracy {row['rewards/accuracies']:.0%}"
        eta = _clock(self.eta(row["step"]))
        if self.mode == "rich" and self.bar is not None:
            self.bar.update(self.task, completed=row["step"], info=text, eta=eta)
            if row.get("kind") == "eval":
                self.bar.console.print(text)
        elif self.mode == "plain":
            prefix = "" if row.get("kind") == "eval" else f"step {row['step']}/{self.total}: "
            print(f"{prefix}{text} eta {eta}", file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        """A one-off line (resume, save, stop)."""
        if self.mode == "rich" and self.bar is not None:
            self.bar.console.print(text)
        elif self.mode != "none":
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        """Stop the progress bar and flush TensorBoard."""
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _clock(seconds: float | None) -> str:
    """'1:02:03' / '4:05' for a duration, '-' when unknown."""
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _tensorboard_writer(path: Path):
    """A SummaryWriter, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))
