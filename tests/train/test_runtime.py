"""The process around a run (lorakit.train.runtime): precision, per-step seeds, frozen weights
cast, the output folder checked. (The re-exec with tcmalloc: tests/test_startup.py.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.train.runtime import (
    cast_frozen,
    check_output_dir,
    init_distributed,
    is_main_process,
    step_seed,
)


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
