"""The process around a run (lorakit.train.runtime): the CLI's re-exec with tcmalloc and a short
OpenMP spin, precision, per-step seeds, frozen weights cast, the output folder checked."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.train.runtime import (
    WAIT_POLICY,
    cast_frozen,
    check_output_dir,
    find_tcmalloc,
    init_distributed,
    is_main_process,
    startup_env,
    step_seed,
    tcmalloc_loaded,
)


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


def test_precision_auto_resolves_per_device():
    from lorakit.train.runtime import cpu_has_native_bf16, resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32"


def test_step_seed_draws_depend_on_seed_step_and_rank_only():
    def draw(seed, step, rank):
        torch.rand(5)  # whatever ran before: the step's reseed makes it irrelevant
        step_seed(seed, step, rank)
        return torch.rand(4)

    assert torch.equal(draw(3, 7, 0), draw(3, 7, 0))
    for other in ((4, 7, 0), (3, 8, 0), (3, 7, 1)):
        assert not torch.equal(draw(3, 7, 0), draw(*other)), other


def test_cast_frozen_casts_frozen_matrices_only():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    model[1].requires_grad_(False)
    # frozen: Linear 0's weight (a matrix), its bias and the norm's two vectors; trainable: 2
    assert cast_frozen(model, torch.bfloat16) == 1
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes.pop("0.weight") == torch.bfloat16
    assert set(dtypes.values()) == {torch.float32}
    assert cast_frozen(model, torch.bfloat16) == 0  # already cast


def test_one_process_outside_torchrun_is_rank_0_of_1(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    ctx = init_distributed(torch.device("cpu"))
    assert (ctx.rank, ctx.world_size, ctx.main, ctx.created) == (0, 1, True, False)
    assert is_main_process()
    monkeypatch.setenv("RANK", "1")
    assert not is_main_process()


def test_check_output_dir_creates_the_folder_and_refuses_too_little_space(tmp_path):
    check_output_dir(tmp_path / "a" / "run", need_bytes=0)
    assert list((tmp_path / "a" / "run").iterdir()) == []  # the write probe is removed
    with pytest.raises(ConfigError, match=r"MiB free; checkpoints need about \d+ MiB"):
        check_output_dir(tmp_path / "a" / "run", need_bytes=2**62)  # 4 EiB: no disk has it
