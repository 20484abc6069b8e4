"""`--adapter` values: NAME=PATH or a bare PATH (the rule itself: tests/serve/test_registry.py),
and a missing folder refused before the command line imports torch or transformers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lorakit.adapter_specs import check_adapter_folders
from lorakit.errors import ConfigError

SRC = Path(__file__).parents[1] / "src"


def test_a_missing_folder_is_named_with_its_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "good").mkdir()
    check_adapter_folders(["generate", "base", "hi", "--adapter", "good", "--adapter=x=good"])
    with pytest.raises(ConfigError, match=f"--adapter sql: adapter folder {tmp_path / 'nope'} "):
        check_adapter_folders(["serve", "base", "--adapter", "good", "--adapter=sql=nope"])
    check_adapter_folders(["generate", "base", "--adapter"])  # typer reports the missing value


def test_the_command_line_fails_before_importing_torch(tmp_path):
    code = (
        "import sys; from lorakit.cli.main import main; "
        f"sys.argv = ['lorakit', 'generate', 'base', 'hi', '--adapter', {str(tmp_path / 'no')!r}]; "
        "code = main(); print(code, 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
    )
    assert done.stdout.split() == ["1", "False", "False"], done.stderr
    assert f"adapter folder {tmp_path / 'no'} does not exist" in done.stderr
