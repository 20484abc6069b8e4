"""Every example runs at a tiny scale (its --tiny flag, and a tiny model folder where it takes
--model)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

from tiny_folders import save_tiny

EXAMPLES = Path(__file__).parents[1] / "examples"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


def run_example(name: str, monkeypatch, *args: str) -> dict:
    """Run examples/<name> as __main__ with these arguments; returns what its main() returned."""
    monkeypatch.setattr(sys, "argv", [name, "--tiny", *args])
    namespace = runpy.run_path(str(EXAMPLES / name), run_name="example")
    return namespace["main"]()


def test_every_example_is_tested():
    tested = {
        "01_sequential_classifier.py",
        "02_int8_pythia_quotes.py",
        "03_from_scratch.py",
        "04_hf_trainer_identity.py",
        "05_multi_adapter.py",
        "06_lightning.py",
    }
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_sequential_classifier(monkeypatch):
    result = run_example("01_sequential_classifier.py", monkeypatch)
    assert result["after"] > result["before"] + 0.1


def test_int8_pythia_quotes(monkeypatch, capsys):
    result = run_example("02_int8_pythia_quotes.py", monkeypatch)
    assert result["int8_layers"] == 8  # 2 layers x (query_key_value, dense, 2 MLP)
    assert "sample: 'The " in capsys.readouterr().out


def test_from_scratch(monkeypatch):
    result = run_example("03_from_scratch.py", monkeypatch)
    assert result["merge_diff"] < 1e-4


def test_hf_trainer_identity(monkeypatch, tiny_dir, tmp_path):
    result = run_example(
        "04_hf_trainer_identity.py",
        monkeypatch,
        "--model",
        str(tiny_dir),
        "--output",
        str(tmp_path),
    )
    adapter = Path(result["adapter"])
    assert (adapter / "adapter_model.safetensors").is_file() and adapter.parent == tmp_path
    assert not (adapter / "adapter").exists()  # no callback: Trainer itself wrote the adapter


def test_multi_adapter(monkeypatch, tiny_dir):
    result = run_example("05_multi_adapter.py", monkeypatch, "--model", str(tiny_dir))
    assert {"lumi", "nova", "base", "half-half"} <= set(result)
    assert result["mixed_matches"]


def test_lightning(monkeypatch, tiny_dir, tmp_path):
    result = run_example(
        "06_lightning.py",
        monkeypatch,
        "--model",
        str(tiny_dir),
        "--output",
        str(tmp_path / "adapter"),
    )
    assert result["reload_diff"] < 1e-5
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
