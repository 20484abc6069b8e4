"""The command line starts without the heavy libraries: `lorakit --version` and `--help` import
neither torch nor transformers, datasets or rich (which is what keeps them well under a
second; typer itself brings pydantic), `import lorakit` stays light while every public name
still imports, and `--help` prints option names whole."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "datasets", "rich")


def modules_after(code: str) -> set[str]:
    """Top-level modules loaded by a fresh interpreter running `code`."""
    probe = f"{code}\nimport sys; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.splitlines()[-1].split())


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["train", "--help"], []])
def test_version_and_help_import_no_heavy_library(args):
    code = f"from lorakit.cli import main\nassert main({args!r}) == 0"
    loaded = modules_after(code)
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_import_lorakit_is_light_and_every_public_name_imports():
    assert not modules_after("import lorakit") & {"torch", "transformers"}
    import lorakit

    for name in lorakit.__all__:
        assert getattr(lorakit, name) is not None, name
    assert lorakit.PeftModel is lorakit.LoraModel
    assert set(lorakit.__all__) <= set(dir(lorakit))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lorakit.nope  # noqa: B018


def test_help_prints_option_names_whole(capsys):
    from lorakit.cli import main

    assert main(["generate", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--repetition-penalty" in text and "…" not in text


def test_init_points_at_the_config_that_runs_offline(tmp_path, capsys):
    import yaml

    from lorakit.cli import main

    assert main(["init", str(tmp_path)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    config = tmp_path / "smollm2-lora.yaml"
    assert last.startswith(f"next: lorakit train {config}")
    data = yaml.safe_load(config.read_text())  # the built-in model and data: no hub needed
    assert data["model"]["name_or_path"] == "smollm2-135m-instruct"
    assert data["data"]["dataset"] == "identity"
