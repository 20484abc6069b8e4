"""What a run shows while it trains: an eta from the run's own mean step time on every step (not
rich's windowed estimate, which shows -:--:-- when steps are slow), a legend for tok/s, and the
eval loss before the first step."""

from __future__ import annotations

import json

import pytest
from test_loop import lora_model, make_batches, quick

from lorakit.train import TrainConfig, train
from lorakit.train.log import LEGEND, RunLog, _clock


def test_eta_is_the_mean_step_time_times_the_steps_left(tmp_path, monkeypatch):
    clock = {"now": 100.0}
    monkeypatch.setattr("lorakit.train.log.time.perf_counter", lambda: clock["now"])
    config = TrainConfig(progress="none", tensorboard=False)
    log = RunLog(tmp_path, config, total_steps=10, start_step=2)
    assert log.eta(2) is None  # nothing measured yet
    clock["now"] += 90.0  # 3 steps (3..5) took 90 s: 30 s a step, 5 steps left
    assert log.eta(5) == pytest.approx(150.0)
    assert [_clock(None), _clock(150.0), _clock(3725.0)] == ["-", "2:30", "1:02:05"]


@pytest.mark.parametrize("progress", ["plain", "rich"])
def test_every_shown_line_has_an_eta_and_the_legend_explains_tok_s(tmp_path, capsys, progress):
    config = quick(max_steps=3, grad_accum_steps=1, progress=progress, log_every=1)
    train(lora_model(0.0), None, make_batches(3), None, config, tmp_path)
    err = capsys.readouterr().err
    assert "tok/s: input tokens of the step" in err and "eta:" in err
    assert "-:--:--" not in err
    if progress == "plain":
        steps = [line for line in err.splitlines() if line.startswith("step ")]
        assert len(steps) == 3 and all(" eta " in line for line in steps)
        assert steps[-1].endswith("eta 0:00")  # the last step leaves nothing
    assert LEGEND.startswith("tok/s")


def test_the_eval_loss_before_training_is_reported(tmp_path, capsys):
    batches = make_batches(4)
    config = quick(max_steps=2, grad_accum_steps=1, progress="plain", eval_every=2)
    result = train(lora_model(0.0), None, batches, batches[:2], config, tmp_path)
    evals = [r for r in result.history if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]  # the before -> after of the run
    assert "step 0: eval_loss" in capsys.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kind"] == "eval" and rows[0]["step"] == 0
