"""The README's promises: its two commands are what `.ci/run` runs, from a shell with no `python`
on PATH; its Python snippets run; the data formats page's example rows parse as their format."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def bash_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    return [line for b in blocks for line in b.splitlines() if line.startswith("./install.sh")]


def test_ci_runs_the_readme_commands_without_python_on_path():
    done = subprocess.run([str(ROOT / ".ci" / "run"), "--print"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    path_line, *commands = done.stdout.splitlines()
    assert commands == bash_commands() and len(commands) == 2
    assert commands[0].endswith("lorakit quickstart")
    assert commands[1].endswith('python -m pytest -q -m "not gpu"')
    assert all("source .venv/bin/activate" in c for c in commands)  # what install.sh creates
    for folder in path_line.removeprefix("PATH=").split(":"):
        assert not (Path(folder) / "python").exists(), folder
        assert "pyenv" not in folder and "/.venv/" not in folder
    assert 'venv="${LORAKIT_VENV:-.venv}"' in (ROOT / "install.sh").read_text()


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_library_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    snippet = next(b for b in python_blocks() if "nn.Sequential" in b)
    exec(compile(snippet, "README.md", "exec"), {})  # noqa: S102
    saved = json.loads((tmp_path / "my-adapter" / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["0", "2"]


@pytest.mark.slow
def test_readme_builtin_model_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    snippet = next(b for b in python_blocks() if "load_model(" in b and "smollm2" in b)
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)  # noqa: S102
    assert "Paris" in scope["answer"]


def test_data_formats_page_rows_parse_as_their_format():
    from lorakit.data.formats import detect_format, to_messages

    page = (ROOT / "docs" / "data-formats.md").read_text()
    sections = re.findall(r"## `(\w+)`.*?```json\n(.*?)\n```", page, re.S)
    assert [name for name, _ in sections] == [
        "text",
        "prompt_completion",
        "alpaca",
        "sharegpt",
        "messages",
    ]
    for name, line in sections:
        row = json.loads(line)
        assert detect_format(row.keys()) == name
        converted = to_messages(row, name)
        if name == "text":
            assert converted == row["text"]
        else:
            assert converted[-1]["role"] == "assistant"
