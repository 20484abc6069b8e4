"""What a sweep measures (lorakit.jobs.sweep_measure), on hand-made metrics rows and files; the
whole path runs in tests/jobs/test_sweep.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from torch import nn

from lorakit import LoraConfig, get_peft_model
from lorakit.jobs import sweep_measure
from lorakit.jobs.sweep_measure import BASELINE, evaluate_baseline, loss_gap

TRAIN = [{"step": s, "loss": 5.0 - s} for s in (1, 2, 3, 4)]  # losses 4, 3, 2, 1


def test_gap_is_eval_loss_minus_the_mean_train_loss_since_the_last_eval():
    evals = [{"step": 2, "eval_loss": 3.0}, {"step": 4, "eval_loss": 2.0}]
    # steps 1-2: mean 3.5, gap 3.0 - 3.5; steps 3-4: mean 1.5, gap 2.0 - 1.5
    assert loss_gap(TRAIN, evals) == [[2, -0.5], [4, 0.5]]


def test_an_eval_with_no_training_before_it_has_no_gap():
    evals = [{"step": 0, "eval_loss": 5.0}, {"step": 4, "eval_loss": 2.0}]
    assert loss_gap(TRAIN, evals) == [[4, 2.0 - 2.5]]  # mean of 4, 3, 2, 1


def test_tail_mean_is_the_last_tenth_of_the_losses_at_least_one():
    assert sweep_measure._tail_mean([]) is None
    assert sweep_measure._tail_mean([5.0, 1.0]) == 1.0  # ceil(0.2) = 1 loss
    assert sweep_measure._tail_mean([float(i) for i in range(1, 21)]) == 19.5  # 19 and 20


def test_a_kept_baseline_is_read_back_without_loading_a_model(tmp_path):
    kept = {"final_eval_loss": 2.5, "answers": [{"prompt": "p", "answer": "a"}]}
    (tmp_path / BASELINE).write_text(json.dumps(kept))
    shown = []
    assert evaluate_baseline(SimpleNamespace(output_dir=tmp_path), shown.append) == kept
    assert shown == []  # no "base model (no training)" line: nothing was evaluated


def test_adapter_parameters_count_the_saved_tensors(tmp_path):
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    get_peft_model(model, LoraConfig(r=2, target_modules=["0", "2"])).save_pretrained(tmp_path)
    # layer 0: A 2x6 + B 4x2 = 20; layer 2: A 2x4 + B 3x2 = 14
    assert sweep_measure._adapter_parameters(tmp_path) == 34
    assert sweep_measure._folder_bytes(tmp_path) == pytest.approx(
        sum(p.stat().st_size for p in tmp_path.iterdir() if p.is_file())
    )
