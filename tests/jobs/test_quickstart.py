"""`lorakit quickstart`: the README's main job, end to end on the real built-in model (a shortened
setting in CI), and its guard against deleting a directory it did not write."""

from __future__ import annotations

import json

import pytest

from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.jobs.quickstart import MARKER, QUESTIONS, QuickstartSettings, prepare_output


def test_questions_are_held_out_and_bilingual():
    from lorakit.data.pipeline import DataConfig, eval_examples

    train = {e["messages"][-1]["content"] for e in eval_examples(DataConfig(dataset="identity"))}
    assert not set(QUESTIONS) & train
    assert any(any(ord(c) > 0x3000 for c in q) for q in QUESTIONS)  # Chinese
    assert any(q.isascii() for q in QUESTIONS)  # English


def test_output_directory_guard(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="--overwrite"):
        prepare_output(QuickstartSettings(output_dir=out))
    with pytest.raises(ConfigError, match="refusing to delete"):
        prepare_output(QuickstartSettings(output_dir=out, overwrite=True))
    (out / "notes.txt").unlink()
    (out / MARKER).write_text("{}")
    (out / "metrics.jsonl").write_text("")
    assert prepare_output(QuickstartSettings(output_dir=out, overwrite=True)) == out
    assert not out.exists()


@pytest.mark.slow
def test_quickstart_end_to_end_on_the_builtin_model(tmp_path, capsys):
    out = tmp_path / "quickstart"
    # Shortened: fewer steps and shorter answers than the default (30 steps, 32 tokens); 12
    # tokens still reach the name ("I am Lumi", "我是Lumi").
    argv = ["quickstart", "--output", str(out), "--steps", "12", "--lr", "2e-3",
            "--max-new-tokens", "12"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "Before fine-tuning" in text and "After fine-tuning" in text
    summary = json.loads((out / MARKER).read_text())
    assert summary["eval_loss_after"] < 0.5 * summary["eval_loss_before"]
    assert summary["name_rate_after"] > summary["name_rate_before"]
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert (out / "plots" / "loss.png").is_file()
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [r["question"] for r in rows] == QUESTIONS
