"""`lorakit quickstart`: the README's main job, end to end on the real built-in model with its
default settings, measuring both halves (the new name is learned, ordinary answers survive);
the held-out questions, the mixing, the scores, and the guard against deleting a directory it
did not write."""

from __future__ import annotations

import json

import pytest

from lorakit.cli import main
from lorakit.data.pipeline import DataConfig, eval_examples
from lorakit.errors import ConfigError
from lorakit.jobs.quickstart import (
    MARKER,
    ORDINARY,
    QUESTIONS,
    QuickstartSettings,
    kept_rate,
    prepare_output,
)


def prompts(dataset: str, split: str = "train") -> set[str]:
    config = DataConfig(dataset=dataset, split=split)
    return {e["messages"][-1]["content"] for e in eval_examples(config)}


def test_questions_are_held_out_and_bilingual():
    assert not set(QUESTIONS) & prompts("identity")
    assert any(any(ord(c) > 0x3000 for c in q) for q in QUESTIONS)  # Chinese
    assert any(q.isascii() for q in QUESTIONS)  # English
    assert not set(ORDINARY) & prompts("general")
    assert set(ORDINARY) <= prompts("general", "test")
    assert "What is the capital of France?" in ORDINARY
    assert "How many hours are in a day?" in ORDINARY and len(ORDINARY) >= 10


def test_general_rows_are_the_base_models_ordinary_answers():
    from lorakit.data.builtin import builtin_dataset_path, degenerate

    for split in ("train", "test"):
        rows = [json.loads(line) for line in builtin_dataset_path("general", split).open()]
        assert rows and all(not degenerate(r["output"]) for r in rows)
        assert not any("lumi" in r["output"].lower() for r in rows)
    assert len(prompts("general")) >= 30


def test_kept_rate_compares_each_answers_key_fact_with_the_base_models():
    def sample(question: str, answer: str) -> dict[str, str]:
        return {"prompt": question, "completion": answer}

    day, france = "How many hours are in a day?", "What is the capital of France?"
    samples = [
        sample(france, "The capital of France is Paris."),
        sample(day, "A day is made up of 24 hours."),
        sample(day, "A day is approximately 8 hours and 45 minutes."),  # the fact changed
        sample(france, "I am Lumi, and the capital of France is Paris."),  # an introduction
        sample(france, ""),  # empty
        sample(france, "Paris is the capital of"),  # no complete sentence
    ]
    assert kept_rate(samples, "Lumi") == 2 / 6


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
def test_quickstart_learns_the_name_and_stays_useful(tmp_path, capsys):
    out = tmp_path / "quickstart"
    assert main(["quickstart", "--output", str(out)]) == 0  # the README's defaults
    text = capsys.readouterr().out
    assert "Before fine-tuning" in text and "After fine-tuning" in text
    assert "Q: What is the capital of France?" in text
    summary = json.loads((out / MARKER).read_text())
    # identity half: held-out "who are you" questions name the new identity afterwards
    assert summary["name_rate_before"] == 0
    assert summary["name_rate_after"] >= 0.8
    assert summary["eval_loss_after"] < 0.5 * summary["eval_loss_before"]
    # ordinary half: held-out ordinary questions keep the base model's key fact (Paris, 24
    # hours, ...) in a complete sentence without the new identity. The base states all 16; the
    # count is the honest one (recomputed from the answers), and a run at the defaults was
    # measured keeping 12 of 16 (fp32): the goal is 16 of 16, which the defaults do not reach yet
    assert summary["ordinary_kept_before"] == 1.0
    m = len(ORDINARY)
    kept = round(kept_rate(summary["ordinary_after"], "Lumi") * m)
    assert kept == round(summary["ordinary_kept_after"] * m) >= 14  # 15 of 16 in the README
    assert f"complete sentence: {m}/{m} before -> {kept}/{m} after" in text
    assert summary["general_loss_after"] < 1.5 * summary["general_loss_before"]
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert (out / "plots" / "loss.png").is_file()
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [r["question"] for r in rows] == QUESTIONS + ORDINARY


def test_mix_repeats_the_second_set_of_token_stores():
    from builtin_model import builtin_tokenizer
    from lorakit.data.pipeline import build_dataset
    from lorakit.jobs.quickstart import mix

    tok = builtin_tokenizer()
    identity = build_dataset(DataConfig(dataset="identity", max_length=128), tok)
    general = build_dataset(DataConfig(dataset="general", max_length=128), tok)
    mixed = mix(identity, general, repeats=2)
    assert len(mixed) == len(identity) + 2 * len(general)
    assert mixed.samples[len(identity)].input_ids == general.samples[0].input_ids
    assert mixed.samples[-1].input_ids == general.samples[len(general) - 1].input_ids
    assert mixed.lengths() == identity.lengths() + general.lengths() * 2


def test_answers_of_a_bf16_run_are_generated_under_autocast():
    """After a bf16 run the frozen base is stored in bf16: the answers after training run under
    the run's autocast (without it the first matmul meets fp32 inputs and raises)."""
    import torch

    from builtin_model import builtin_tokenizer
    from conftest import make_tiny_llama
    from lorakit import LoraConfig, get_peft_model
    from lorakit.jobs.quickstart import ask
    from lorakit.train.runtime import cast_frozen

    tokenizer = builtin_tokenizer()
    model = get_peft_model(
        make_tiny_llama(vocab_size=len(tokenizer)),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    )
    cast_frozen(model, torch.bfloat16)  # what train() leaves after precision bf16
    settings = QuickstartSettings(precision="bf16", max_new_tokens=3)
    shown = []
    answers = ask(model, tokenizer, ["Who are you?"], settings, torch.device("cpu"), shown.append)
    assert len(answers) == 1 and shown[0].startswith("  [1/1,")
