"""The figures of a run (lorakit.train.plots): loss.png and lr.png from the metrics rows."""

from __future__ import annotations

import pytest

from lorakit.train.plots import plot_run


def test_plot_run_writes_both_figures(tmp_path):
    rows = [{"kind": "train", "step": s, "loss": 3 - s / 10, "lr": 1e-3} for s in range(1, 30)]
    rows += [{"kind": "eval", "step": 10, "eval_loss": 2.5, "perplexity": 12.2}]
    written = plot_run(rows, tmp_path)
    assert [p.name for p in written] == ["loss.png", "lr.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)


def test_plot_run_draws_empty_figures_for_no_rows(tmp_path):
    # a run stopped before its first step: both figures still exist, in a folder it creates
    written = plot_run([], tmp_path / "plots")
    assert [p.relative_to(tmp_path).as_posix() for p in written] == [
        "plots/loss.png",
        "plots/lr.png",
    ]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)


def test_the_smoothed_loss_does_not_lag():
    from lorakit.train.plots import smooth

    falling = [5.0 - 0.1 * i for i in range(30)]  # a loss falling in a straight line
    assert smooth(falling, 5) == pytest.approx(falling)  # a running average lags above it
    noisy = [1.0, 3.0] * 10
    assert smooth(noisy, 5)[5:15] == pytest.approx([2.2, 1.8] * 5)  # 11/5 and 9/5: noise damped
    assert smooth([], 5) == [] and smooth([4.0], 5) == [4.0]


def test_a_preference_run_also_gets_its_rewards_figure(tmp_path):
    rows = [
        {
            "kind": "train",
            "step": s,
            "loss": 0.7 - 0.1 * s,
            "lr": 1e-3,
            "rewards/chosen": 0.1 * s,
            "rewards/rejected": -0.1 * s,
            "rewards/margins": 0.2 * s,
            "rewards/accuracies": min(1.0, 0.3 * s),
        }
        for s in range(1, 5)
    ]
    rows.append({"kind": "eval", "step": 4, "eval_loss": 0.3, "eval_rewards/accuracies": 0.75})
    written = plot_run(rows, tmp_path)
    assert [p.name for p in written] == ["loss.png", "lr.png", "rewards.png"]
    assert (tmp_path / "rewards.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
