"""Checkpoint pieces: atomic directories, optimizer/RNG round trips, finding the run to resume."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from lorakit.files import atomic_dir
from lorakit.train.checkpoint import (
    MARKER,
    latest_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    prune_checkpoints,
    rng_state,
    set_rng_state,
)


def test_atomic_dir_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "step-00000001", MARKER) as staging:
        (staging / "state.json").write_text("{}")
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_and_marks_complete(tmp_path):
    for text in ("old", "new"):
        with atomic_dir(tmp_path / "best", MARKER) as staging:
            (staging / "file").write_text(text)
    assert (tmp_path / "best" / "file").read_text() == "new"
    assert (tmp_path / "best" / MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_atomic_dir_without_marker_holds_only_the_written_files(tmp_path):
    # final/ and best/ are loaded by peft and transformers: nothing but their own files
    for text in ("old", "new"):
        with atomic_dir(tmp_path / "final") as staging:
            (staging / "file").write_text(text)
    assert (tmp_path / "final" / "file").read_text() == "new"
    assert sorted(p.name for p in (tmp_path / "final").iterdir()) == ["file"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_latest_and_prune_skip_incomplete(tmp_path):
    for step in (1, 2, 3):
        with atomic_dir(tmp_path / f"step-{step:08d}", MARKER) as staging:
            (staging / "state.json").write_text("{}")
    (tmp_path / "step-00000009").mkdir()  # no marker: a crash mid-write
    assert latest_checkpoint(tmp_path).name == "step-00000003"
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-00000002",
        "step-00000003",
        "step-00000009",
    ]


def test_optimizer_state_round_trip_is_exact():
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.99))
    for _ in range(3):
        model(torch.randn(5, 4)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    tensors, meta = optimizer_to_flat(optimizer)
    meta = json.loads(json.dumps(meta))  # what state.json holds
    fresh = torch.optim.AdamW(model.parameters(), lr=5.0)
    optimizer_from_flat(fresh, tensors, meta)
    want, got = optimizer.state_dict(), fresh.state_dict()
    assert got["param_groups"] == want["param_groups"]
    for index, state in want["state"].items():
        for key, value in state.items():
            assert torch.equal(got["state"][index][key], value), key


def test_rng_state_round_trip():
    tensors, scalars = rng_state()
    draws = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(tensors, scalars)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(draws[0], again[0]) and draws[1:] == again[1:]


def test_an_earlier_run_is_continued_with_the_cli_flag(tmp_path):
    from lorakit.errors import ConfigError
    from lorakit.train.checkpoint import find_resume

    done = tmp_path / "checkpoints" / "step-00000002"
    done.mkdir(parents=True)
    (done / "state.json").write_text("{}")
    (done / "COMPLETE").write_text("ok\n")
    with pytest.raises(ConfigError) as caught:
        find_resume(tmp_path, None)
    # the command-line flag first; the Python spelling only as the library's alternative
    assert "`lorakit train ... --resume auto`" in str(caught.value)
    assert "pass resume='auto'" not in str(caught.value)
