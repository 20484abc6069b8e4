"""Checkpoint pieces: atomic directories, optimizer/RNG round trips, schedules; the CLI's re-exec
with tcmalloc and a short OpenMP spin."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

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
from lorakit.train.optim import lr_factor, warmup_steps
from lorakit.train.runtime import WAIT_POLICY, find_tcmalloc, startup_env, tcmalloc_loaded


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


def test_schedules():
    total, warm = 10, warmup_steps(10, 0, 0.2)
    assert warm == 2
    assert [lr_factor(s, total, warm, "constant") for s in range(4)] == [1 / 3, 2 / 3, 1, 1]
    assert lr_factor(2, total, warm, "cosine") == 1.0
    assert lr_factor(10, total, warm, "cosine") == pytest.approx(0.0)
    assert lr_factor(6, total, warm, "cosine") == pytest.approx(0.5)
    assert lr_factor(6, total, warm, "linear", min_lr_ratio=0.1) == pytest.approx(0.55)


def test_startup_env_sets_a_short_openmp_spin_unless_the_user_chose_one():
    no_tcmalloc = {"LORAKIT_NO_TCMALLOC": "1"}
    assert startup_env(no_tcmalloc) == WAIT_POLICY
    assert startup_env({**no_tcmalloc, "OMP_NUM_THREADS": "3"}) == WAIT_POLICY  # threads: theirs
    for user in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "300000"}):
        assert startup_env({**no_tcmalloc, **user}) == {}  # the user's setting wins
    assert startup_env({**no_tcmalloc, "LORAKIT_NO_WAIT_POLICY": "1"}) == {}


@pytest.mark.skipif(
    find_tcmalloc() is None or tcmalloc_loaded(), reason="tcmalloc not installed, or loaded"
)
def test_startup_env_prepends_tcmalloc_to_the_users_preload():
    lib = find_tcmalloc()
    assert startup_env({"LD_PRELOAD": "/x.so"})["LD_PRELOAD"] == f"{lib}:/x.so"
    assert "LD_PRELOAD" not in startup_env({"LORAKIT_NO_TCMALLOC": "1"})


def openmp_spin_count(stderr: str) -> str:
    """The spin count libgomp used, from the last OMP_DISPLAY_ENV=VERBOSE block (the re-exec's)."""
    return [line.split("'")[1] for line in stderr.splitlines() if "GOMP_SPINCOUNT =" in line][-1]


def test_reexec_reaches_openmp_once_and_the_users_choice_wins(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(
        "import sys\nfrom lorakit.train.runtime import reexec_for_speed, tcmalloc_loaded\n"
        "reexec_for_speed()\nprint('loaded', tcmalloc_loaded(), sys.argv[1:])\n"
    )
    drop = (
        "LD_PRELOAD",
        "LORAKIT_NO_TCMALLOC",
        "LORAKIT_NO_WAIT_POLICY",
        "OMP_WAIT_POLICY",
        "GOMP_SPINCOUNT",
        "LORAKIT_REEXEC",
    )
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PYTHONPATH=os.pathsep.join(p for p in sys.path if p), OMP_DISPLAY_ENV="VERBOSE")
    out = subprocess.run(
        [sys.executable, str(script), "x"], env=env, capture_output=True, text=True
    )
    assert out.stdout.strip() == f"loaded {find_tcmalloc() is not None} ['x']", out.stderr
    assert openmp_spin_count(out.stderr) == WAIT_POLICY["GOMP_SPINCOUNT"]
    env.update(LORAKIT_NO_TCMALLOC="1", OMP_WAIT_POLICY="ACTIVE")
    out = subprocess.run(
        [sys.executable, str(script), "x"], env=env, capture_output=True, text=True
    )
    assert out.stdout.strip() == "loaded False ['x']", out.stderr
    assert openmp_spin_count(out.stderr) == "30000000000"  # libgomp's ACTIVE, not ours


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
