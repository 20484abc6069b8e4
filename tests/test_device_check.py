"""benchmarks/device_check.sh --dry-run: every step of the GPU check runs on the CPU, tiny, and
ends in the one table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_dry_run_runs_every_step_and_prints_the_table():
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "2"}
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "device_check.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    out = done.stdout
    assert done.returncode == 0, out[-2000:] + done.stderr[-2000:]
    for heading in ("1/3 environment", "2/3 tests marked gpu", "3/3 training and decoding"):
        assert heading in out
    assert "tests collected" in out  # the gpu-marked tests were found
    table = [line for line in out.splitlines() if line.startswith("| tiny |")]
    engines = [line.split("|")[3].strip() for line in table]
    assert engines == ["lorakit", "peft", "lorakit QLoRA nf4", "lorakit", "peft"]
    assert all("error" not in line.lower() for line in table)
    assert table[-1].endswith("| same greedy tokens |")  # lorakit and peft decode alike
    assert "done, status 0" in out
