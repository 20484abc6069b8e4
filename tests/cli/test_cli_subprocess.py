"""`lorakit` as a real subprocess, the way a user runs it: the console script, exit codes, and an
error message without a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from lorakit import __version__

CONFIGS = Path(__file__).parents[2] / "configs"


def lorakit(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("lorakit")
    command = [exe] if exe else [sys.executable, "-m", "lorakit.cli"]
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "100"}
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env
    )


def test_lorakit_as_a_user_runs_it(tmp_path):
    done = lorakit("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"lorakit {__version__}"

    done = lorakit("validate", str(CONFIGS / "smollm2-lora.yaml"), "train.max_steps=5")
    assert done.returncode == 0, done.stderr
    assert "max_steps: 5" in done.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  rnak: 8\n")
    done = lorakit("train", str(bad))
    assert done.returncode == 1
    assert "unknown key `lora.rnak` (did you mean `r`?)" in done.stderr
    assert "Traceback" not in done.stderr

    done = lorakit("train", "missing.yaml", cwd=tmp_path)
    assert done.returncode == 1 and "missing.yaml not found" in done.stderr
