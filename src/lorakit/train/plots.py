"""Figures of a run (matplotlib, Agg backend): train and eval loss, learning rate; for a
preference run, the rewards and the reward accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def smooth(values: Sequence[float], window: int) -> list[float]:
    """A centred moving mean, for a readable train-loss line: each point the mean of the
    `window` values around it (fewer, still centred, near the ends). Unlike a running average
    it does not lag: a loss falling in a straight line is drawn on that line."""
    half = window // 2
    out = []
    for i in range(len(values)):
        reach = min(half, i, len(values) - 1 - i)
        part = values[i - reach : i + reach + 1]
        out.append(sum(part) / len(part))
    return out


def plot_run(rows: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Write loss.png (train loss, smoothed, and eval loss) and lr.png from metrics rows."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    train = [r for r in rows if r.get("kind", "train") == "train" and "loss" in r]
    evals = [r for r in rows if r.get("kind") == "eval"]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        steps, losses = [r["step"] for r in train], [r["loss"] for r in train]
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="train")
        if len(train) > 10:
            window = max(3, len(train) // 10) | 1  # odd: centred
            label = f"train (mean of {window} steps)"
            ax.plot(steps, smooth(losses, window), color="tab:blue", label=label)
    if evals:
        ax.plot(
            [r["step"] for r in evals],
            [r["eval_loss"] for r in evals],
            "o-",
            color="tab:orange",
            label="eval",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=100)
    plt.close(fig)
    written.append(out_dir / "loss.png")

    fig, ax = plt.subplots(figsize=(7, 3))
    if train:
        ax.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:green")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "lr.png", dpi=100)
    plt.close(fig)
    written.append(out_dir / "lr.png")
    if any("rewards/margins" in r for r in train):
        written.append(_plot_rewards(plt, train, evals, out_dir / "rewards.png"))
    return written


def _plot_rewards(plt, train: list, evals: list, path: Path) -> Path:
    """rewards.png: chosen and rejected rewards and their margin (train), the reward accuracy
    (train and eval) on a second axis."""
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in train]
    for key, color in (("chosen", "tab:green"), ("rejected", "tab:red"), ("margins", "tab:blue")):
        ax.plot(steps, [r[f"rewards/{key}"] for r in train], color=color, label=f"{key} reward")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    acc = ax.twinx()
    acc.plot(steps, [r["rewards/accuracies"] for r in train], ":", color="gray", label="accuracy")
    scored = [r for r in evals if "eval_rewards/accuracies" in r]
    if scored:
        acc.plot(
            [r["step"] for r in scored],
            [r["eval_rewards/accuracies"] for r in scored],
            "o--",
            color="black",
            label="eval accuracy",
        )
    acc.set_ylim(-0.05, 1.05)
    acc.set_ylabel("reward accuracy")
    lines = ax.get_legend_handles_labels()
    more = acc.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
