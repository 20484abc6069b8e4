"""`lorakit train` and the user's files: refusals that leave them byte-identical, a read-only
directory, the same seed giving the same adapter, and stop signals in a real process."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from lorakit.cli import main
from lorakit.train.runtime import Interrupted
from tiny_folders import save_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


def write_config(folder: Path, model_dir: Path, out: Path, **train) -> str:
    data = {
        "output_dir": str(out),
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1},
        "data": {"dataset": "identity", "limit": 12, "max_length": 128},
        "train": {
            "max_steps": 3,
            "batch_size": 4,
            "lr": 1e-2,
            "precision": "fp32",
            "progress": "plain",
            "tensorboard": False,
            "plots": False,
            **train,
        },
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_the_base_model_folder_as_output_dir_is_refused(tiny_dir, tmp_path, capsys):
    before = digests(tiny_dir)
    config = write_config(tmp_path, tiny_dir, tiny_dir)
    for extra in ([], ["--resume", "auto"]):
        assert main(["train", config, *extra]) == 1
        err = capsys.readouterr().err
        assert "already holds config.json (it is a model folder)" in err and "Traceback" not in err
    assert digests(tiny_dir) == before


def test_a_read_only_output_dir_is_one_clear_error(tiny_dir, tmp_path, capsys):
    disk = tmp_path / "ro"
    disk.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(disk)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        assert main(["train", write_config(tmp_path, tiny_dir, disk / "run")]) == 1
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    err = capsys.readouterr().err
    assert f"error: output_dir {disk / 'run'} is not writable (Read-only file system)" in err
    assert "Traceback" not in err


def test_two_identical_runs_give_bit_identical_adapters(tiny_dir, tmp_path):
    adapters = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = tmp_path / name
        (tmp_path / name).mkdir()
        config = write_config(tmp_path / name, tiny_dir, out / "run", seed=seed)
        assert main(["train", config]) == 0
        adapters[name] = load_file(str(out / "run" / "final" / "adapter_model.safetensors"))
    a, b, c = adapters["a"], adapters["b"], adapters["c"]
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # bit for bit
    assert any((a[k] != c[k]).any() for k in a)  # and the seed does matter


def start(config: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "LORAKIT_NO_TCMALLOC": "1", "NO_COLOR": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "lorakit", "train", config, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def train_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    rows = [json.loads(line) for line in lines if line.strip()]
    return [row["step"] for row in rows if row["kind"] == "train"]


def wait_for_training(process: subprocess.Popen, out: Path) -> None:
    deadline = time.monotonic() + 120
    while not train_steps(out):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.02)


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_and_resume_continues(tiny_dir, tmp_path):
    out = tmp_path / "run"
    config = write_config(tmp_path, tiny_dir, out, max_steps=100_000)
    process = start(config)
    wait_for_training(process, out)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    steps = train_steps(out)
    checkpoints = [p.name for p in (out / "checkpoints").iterdir()]
    assert checkpoints == [f"step-{steps[-1]:08d}"]  # the step running when the signal came
    assert f"interrupted: checkpoint saved at step {steps[-1]}/100000" in err
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err

    more = steps[-1] + 2
    process = start(config, f"train.max_steps={more}", "--resume", "auto", "--force")
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert train_steps(out) == list(range(1, more + 1))
    assert (out / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_exits_with_its_code(tiny_dir, tmp_path, monkeypatch, capsys, signum):
    # train() raises Interrupted on a second signal (tests/train/test_loop.py); the command
    # turns it into 128 + the signal's number and one line
    import lorakit.jobs.finetune as finetune

    def stopped(*args, **kwargs):
        raise Interrupted(signum)

    monkeypatch.setattr(finetune, "run_training", stopped)
    assert main(["train", write_config(tmp_path, tiny_dir, tmp_path / "run")]) == 128 + signum
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"


def test_sigint_during_start_up_prints_one_line(tiny_dir, tmp_path):
    process = start(write_config(tmp_path, tiny_dir, tmp_path / "run"))
    first = process.stdout.readline()  # the model is loaded; the data is being read next
    assert first.startswith("LoRA:"), first
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err, err
