"""Ctrl-C at any moment of a command's start-up: one line, `interrupted`, and exit code 130.

The signal is made to land at a chosen moment, not after a guessed sleep: the process is
started through a small bootstrap whose import hook raises SIGINT in the process itself when a
chosen module is first imported (`torch.nn` lands in the middle of `import torch`). The
bootstrap then runs `python -m lorakit` as the command line does; the command's own re-exec
(tcmalloc, the OpenMP spin) runs the same bootstrap again, so the hook is there after it too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tiny_folders import save_tiny

BOOTSTRAP = """
import importlib.abc, runpy, signal, sys
TARGET = {target!r}
class Trip(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == TARGET:
            sys.meta_path.remove(self)
            signal.raise_signal(signal.SIGINT)
        return None
sys.meta_path.insert(0, Trip())
runpy.run_module("lorakit", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


def run_interrupted(target: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run `lorakit ARGS` with SIGINT raised when `target` is first imported."""
    env = {**os.environ, "NO_COLOR": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    env.pop("LORAKIT_REEXEC", None)  # the command's own re-exec runs as it does for users
    code = BOOTSTRAP.format(target=target)
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def assert_one_line(done: subprocess.CompletedProcess, alone: bool = True) -> None:
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == "interrupted", done.stderr
    if alone:  # nothing else was said: only the one line
        assert lines == ["interrupted"], done.stderr


def train_config(folder: Path, model_dir: Path) -> str:
    data = {
        "output_dir": str(folder / "run"),
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 4, "lora_alpha": 8},
        "data": {"dataset": "identity", "limit": 8, "max_length": 64},
        "train": {"max_steps": 2, "batch_size": 4, "precision": "fp32", "plots": False},
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


# the command line itself, the middle of `import torch`, transformers, the job's own modules,
# and the model's code, imported while the model loads
TRAIN_MOMENTS = [
    "lorakit.cli.main",
    "torch.nn",
    "transformers",
    "lorakit.jobs.finetune",
    "transformers.models.llama.modeling_llama",
]


@pytest.mark.parametrize("target", TRAIN_MOMENTS)
def test_ctrl_c_during_train_start_up_is_one_line_and_130(tiny_dir, tmp_path, target):
    done = run_interrupted(target, ["train", train_config(tmp_path, tiny_dir)], tmp_path)
    assert_one_line(done, alone=target != TRAIN_MOMENTS[-1])
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing half-written


def other_commands(tiny_dir: Path, tmp_path: Path) -> dict[str, list[str]]:
    sweep = {"base": train_config(tmp_path, tiny_dir), "variants": {"a": {}, "b": {}}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    model = str(tiny_dir)
    return {
        "serve": ["serve", model],
        "ui": ["ui", "--model", model, "--port", "0"],
        "merge": ["merge", model, str(tmp_path / "adapter"), str(tmp_path / "merged")],
        "sweep": ["sweep", str(tmp_path / "sweep.yaml")],
        "quickstart": ["quickstart", "--output", str(tmp_path / "quick")],
        "eval": ["eval", "--model", model, "--limit", "2"],
        "generate": ["generate", model, "hello"],
        "chat": ["chat", model],
    }


@pytest.mark.parametrize(
    "command", ["serve", "ui", "merge", "sweep", "quickstart", "eval", "generate", "chat"]
)
def test_ctrl_c_while_any_command_imports_torch_is_one_line_and_130(tiny_dir, tmp_path, command):
    done = run_interrupted("torch.nn", other_commands(tiny_dir, tmp_path)[command], tmp_path)
    assert_one_line(done)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "quick").exists()
