"""A run's set-up: what a new run refuses, leftovers cleaned, resume checked, the run config."""

from __future__ import annotations

import contextlib
import json
import signal

import pytest
import torch
import yaml

from conftest import make_tiny_llama
from lorakit import LoraConfig, get_peft_model
from lorakit.errors import ConfigError
from lorakit.train import TrainConfig, train
from lorakit.train.runtime import restore_signals
from lorakit.train.setup import Run, process_group, resolve_config, setup_run, write_run_config

DEAD = 2**30  # above Linux's largest pid: no process has it


def batches(n: int = 4) -> list[dict]:
    """Collated batches of two rows counting up, the first 3 labels masked."""
    out = []
    for i in range(n):
        ids = (torch.arange(2)[:, None] * 7 + i + torch.arange(10)) % 128
        labels = ids.clone()
        labels[:, :3] = -100
        out.append({"input_ids": ids, "labels": labels, "sample_ids": [2 * i, 2 * i + 1]})
    return out


def lora_model():
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    return get_peft_model(make_tiny_llama(), config)


def quick(**overrides) -> TrainConfig:
    base = dict(
        precision="fp32",
        device="cpu",
        lr=1e-2,
        max_steps=2,
        progress="none",
        tensorboard=False,
        plots=False,
    )
    return TrainConfig(**{**base, **overrides})


@contextlib.contextmanager
def set_up(output_dir, config: TrainConfig, *, resume=None, force=False, match=None):
    """A `Run` as `train` sets it up (same calls, same order); signals and threads put back."""
    model = lora_model()
    config, device = resolve_config(config, model)
    with process_group(config, device) as ctx:
        run = Run(model, None, config, output_dir, device, ctx)
        try:
            setup_run(run, batches(), None, resume=resume, force=force, match=match)
            yield run
        finally:
            restore_signals(run.old_handlers)
            if run.governor is not None:
                run.governor.restore()


def test_resolve_config_resolves_precision_and_refuses_fp16_off_cuda():
    model = lora_model()
    config, device = resolve_config(quick(precision="auto"), model)
    assert device.type == "cpu" and config.precision in ("fp32", "bf16")
    with pytest.raises(ConfigError, match="precision='fp16' needs CUDA"):
        resolve_config(quick(precision="fp16"), model)


def test_a_fresh_run_is_planned_and_its_leftovers_cleaned(tmp_path):
    (tmp_path / f".tmp-final-{DEAD}").mkdir()  # a writer killed while saving final/
    (tmp_path / "data.jsonl").write_text("{}")  # other files are no concern
    before = signal.getsignal(signal.SIGINT)
    with set_up(tmp_path, quick(), match={"data": {"path": "x.jsonl"}}) as run:
        assert not (tmp_path / f".tmp-final-{DEAD}").exists()
        removed = tmp_path / f".tmp-final-{DEAD}"
        assert run.notes == [f"removed {removed}, left by a writer that stopped"]
        assert (run.start_step, run.total_steps, run.resumed_from) == (0, 2, None)
        assert run.result.steps == 0 and run.result.output_dir == tmp_path
        # what a resume must find unchanged: the config, the world size, and `match` on top
        assert run.settings["lr"] == 1e-2 and run.settings["world_size"] == 1
        assert run.settings["data"] == {"path": "x.jsonl"}
        assert len(run.params) == 8 and all(p.requires_grad for p in run.params)
        assert run.model.training and not run.has_eval
        assert signal.getsignal(signal.SIGINT) is not before  # Ctrl-C now checkpoints
    assert signal.getsignal(signal.SIGINT) is before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]  # nothing written yet


@pytest.mark.parametrize("name", ["config.json", "metrics.jsonl", "final"])
def test_a_fresh_run_refuses_a_directory_it_would_write_over(tmp_path, name):
    (tmp_path / name).write_text("mine") if "." in name else (tmp_path / name).mkdir()
    before = signal.getsignal(signal.SIGINT)
    with (
        pytest.raises(ConfigError, match="which a new run would write over"),
        set_up(tmp_path, quick()),
    ):
        pass
    assert signal.getsignal(signal.SIGINT) is before  # refused before catching any signal
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_a_resume_with_other_settings_is_refused_unless_forced(tmp_path):
    train(lora_model(), None, batches(), None, quick(), tmp_path)  # checkpoint at step 2
    leftover = tmp_path / "checkpoints" / f".tmp-step-00000003-{DEAD}"
    leftover.mkdir()
    with (
        pytest.raises(ConfigError, match="holds checkpoints of an earlier run"),
        set_up(tmp_path, quick()),
    ):
        pass
    with (
        pytest.raises(ConfigError, match=r"other settings: .*lr"),
        set_up(tmp_path, quick(lr=2e-2, max_steps=3), resume="auto"),
    ):
        pass
    assert not leftover.exists()  # cleaned even by a set-up that refused
    with set_up(tmp_path, quick(lr=2e-2, max_steps=3), resume="auto", force=True) as run:
        assert run.resumed_from == tmp_path / "checkpoints" / "step-00000002"
        assert (run.start_step, run.result.steps, run.total_steps) == (2, 2, 3)
    with set_up(tmp_path, quick(), resume="auto") as run:  # same settings: no force needed
        assert run.start_step == 2


def test_the_run_config_is_written_with_the_train_settings_as_used(tmp_path):
    config = quick()
    write_run_config(tmp_path, config, None)
    assert json.loads((tmp_path / "config.json").read_text()) == {
        "train": config.model_dump(mode="json")
    }
    assert not (tmp_path / "config.yaml").exists()  # no run config given: nothing to run again

    given = {"model": {"name": "tiny"}, "note": "née à Paris", "train": {"lr": 0.5}}
    write_run_config(tmp_path, config, given)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"] == {"name": "tiny"} and saved["train"]["lr"] == 1e-2  # as used
    text = (tmp_path / "config.yaml").read_text(encoding="utf-8")
    assert yaml.safe_load(text) == given and "née à Paris" in text
    assert text.index("model") < text.index("note") < text.index("train")  # the given order
