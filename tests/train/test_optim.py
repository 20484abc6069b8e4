"""The optimizer and the learning-rate schedule (lorakit.train.optim): warmup, cosine / linear /
constant, the parameter groups, the optimizer's state size; LoRA+ through the loop."""

from __future__ import annotations

import pytest
import torch
from test_loop import lora_model, make_batches, quick
from torch import nn

from lorakit.train import train
from lorakit.train.config import TrainConfig
from lorakit.train.optim import build_optimizer, lr_factor, set_lr, state_bytes, warmup_steps


def test_schedules():
    total, warm = 10, warmup_steps(10, 0, 0.2)
    assert warm == 2
    assert [lr_factor(s, total, warm, "constant") for s in range(4)] == [1 / 3, 2 / 3, 1, 1]
    assert lr_factor(2, total, warm, "cosine") == 1.0
    assert lr_factor(10, total, warm, "cosine") == pytest.approx(0.0)
    assert lr_factor(6, total, warm, "cosine") == pytest.approx(0.5)
    assert lr_factor(6, total, warm, "linear", min_lr_ratio=0.1) == pytest.approx(0.55)


def test_explicit_warmup_steps_win_over_the_ratio():
    assert warmup_steps(10, 3, 0.5) == 3  # steps given: the ratio is not read
    assert warmup_steps(10, 0, 0.25) == 3  # ceil(0.25 * 10) = ceil(2.5)
    assert warmup_steps(7, 0, 0.0) == 0


def test_past_the_last_step_the_rate_stays_at_its_floor():
    # no warmup: step 0 is the peak; progress is capped at 1, so step 15 of 10 sits at
    # m + (1 - m) * 0 = m = 0.1 for both decaying schedules
    assert lr_factor(0, 10, 0, "cosine") == 1.0
    for kind in ("cosine", "linear"):
        assert lr_factor(15, 10, 0, kind, min_lr_ratio=0.1) == pytest.approx(0.1)
    # linear without warmup, half way: 1 - 5 / 10
    assert lr_factor(5, 10, 0, "linear") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        lr_factor(5, 10, 0, "step")


def test_matrices_are_decayed_vectors_not_and_set_lr_scales_every_group():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    optimizer, params = build_optimizer(model, TrainConfig(lr=1e-3, weight_decay=0.1))
    groups = [
        (g["lr"], g["weight_decay"], [tuple(p.shape) for p in g["params"]])
        for g in optimizer.param_groups
    ]
    # the Linear's weight is the only matrix; its bias and the norm's weight and bias are 1-D
    assert groups == [(1e-3, 0.1, [(3, 4)]), (1e-3, 0.0, [(3,), (3,), (3,)])]
    assert params == [model[0].weight, model[0].bias, model[1].weight, model[1].bias]
    assert set_lr(optimizer, 0.5) == pytest.approx(5e-4)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([5e-4, 5e-4])


def test_state_bytes_counts_adamw_moments():
    model = nn.Linear(4, 3)
    optimizer, _ = build_optimizer(model, TrainConfig(lr=1e-3))
    assert state_bytes(optimizer) == 0  # no state before the first step
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    # per parameter: exp_avg and exp_avg_sq in fp32 plus a 4-byte fp32 step counter;
    # weight 12 values: 2 * 48 + 4 = 100, bias 3 values: 2 * 12 + 4 = 28
    assert state_bytes(optimizer) == 128


def test_schedule_and_lora_plus_groups(tmp_path):
    model = lora_model(dropout=0.0)
    result = train(
        model,
        None,
        make_batches(2),
        None,
        quick(max_steps=6, grad_accum_steps=1, warmup_steps=2, scheduler="linear", lora_b_lr=1e-1),
        tmp_path,
    )
    lrs = [r["lr"] for r in result.history if r["kind"] == "train"]
    assert lrs[0] == pytest.approx(1e-2 / 3) and lrs[1] == pytest.approx(2e-2 / 3)
    assert lrs[2] == pytest.approx(1e-2) and lrs[-1] == pytest.approx(1e-2 / 4)
