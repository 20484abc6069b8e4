"""What `lorakit eval` runs (lorakit.jobs.evaluation): the base beside base + each adapter on the
same batches, exact match and the identity task's name rate of greedy answers."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.data.pipeline import DataConfig, eval_examples
from lorakit.jobs import evaluation
from lorakit.jobs.evaluation import (
    default_eval_data,
    evaluate_models,
    load_with_adapters,
    score_answers,
)
from lorakit.lora import LoraConfig, LoraModel, get_peft_model
from lorakit.models import load_model
from tiny_folders import save_tiny

DATA = DataConfig(dataset="identity", split="test", limit=4, max_length=128)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny model folder and two adapters for it: `zero` (B = 0, the base's twin) and `tuned`."""
    root = tmp_path_factory.mktemp("eval")
    base = save_tiny(root / "model")
    for name in ("zero", "tuned"):
        torch.manual_seed(0)
        lora = get_peft_model(load_model(str(base)), LoraConfig(r=2, target_modules=["q_proj"]))
        if name == "tuned":
            for module_name, param in lora.named_parameters():
                if "lora_B" in module_name:
                    param.data.normal_(0, 0.5)
        lora.save_pretrained(root / name)
    return root


def test_base_and_each_adapter_on_the_same_batches(folders):
    adapters = {"zero": folders / "zero", "tuned": folders / "tuned"}
    rows = evaluate_models(str(folders / "model"), adapters, DATA)
    assert [r["model"] for r in rows] == ["base", "base + zero", "base + tuned"]
    base, zero, tuned = rows
    assert zero["eval_loss"] == pytest.approx(base["eval_loss"], abs=1e-6)  # B = 0: no change
    assert abs(tuned["eval_loss"] - base["eval_loss"]) > 1e-5  # the tuned adapter is applied
    for row in rows:
        assert row["perplexity"] == pytest.approx(math.exp(row["eval_loss"]), rel=1e-4)
        assert "exact_match" not in row  # only with exact_match=True


def test_load_with_adapters(folders):
    bare, tokenizer = load_with_adapters(str(folders / "model"), {})
    assert not isinstance(bare, LoraModel) and not bare.training
    assert tokenizer.eos_token is not None
    adapters = {"a": folders / "zero", "b": folders / "tuned"}
    both, _ = load_with_adapters(str(folders / "model"), adapters)
    assert isinstance(both, LoraModel) and not both.training
    assert list(both.peft_config) == ["a", "b"]


def test_score_answers_counts_exact_matches_and_the_name(folders, monkeypatch):
    model, tokenizer = load_with_adapters(str(folders / "model"), {})
    references = [e["reference"] for e in eval_examples(DATA)]
    replies = [references[0], "no", references[2].upper(), "I am Lumi."]
    monkeypatch.setattr(evaluation, "greedy_answers", lambda *args: replies)
    score = score_answers(model, tokenizer, DATA, 4, torch.device("cpu"), "fp32")
    assert score["answers"] == 4
    assert score["exact_match"] == 0.5  # the first and third match (case aside), "no" does not
    named = DataConfig(**{**DATA.model_dump(), "template_vars": {"name": "Lumi"}})
    score = score_answers(model, tokenizer, named, 4, torch.device("cpu"), "fp32")
    assert score["name_rate"] == pytest.approx(sum("lumi" in r.lower() for r in replies) / 4)


def test_default_eval_data():
    data = default_eval_data("identity", "test", 7)
    assert (data.dataset, data.split, data.limit) == ("identity", "test", 7)


def test_facts_count_the_answers_keeping_their_key_fact(folders, monkeypatch):
    from lorakit.data.builtin import GENERAL_FACTS

    questions = list(GENERAL_FACTS)
    # the base states every fact; the adapter loses the second question's (24 hours -> 8)
    right = [f"The answer is {GENERAL_FACTS[q][0]}." for q in questions]
    wrong = [*right[:1], "A day is approximately 8 hours and 45 minutes.", *right[2:]]
    calls = iter([right, wrong])
    monkeypatch.setattr(evaluation, "greedy_answers", lambda model, tok, conv, *a: next(calls))
    adapters = {"tuned": folders / "tuned"}
    base, tuned = evaluate_models(str(folders / "model"), adapters, DATA, facts=True)
    assert base["facts_kept"] == 1.0 and tuned["facts_kept"] == (len(questions) - 1) / len(
        questions
    )
    lost = [a for a in tuned["fact_rows"] if not a["kept"]]
    assert [a["prompt"] for a in lost] == [questions[1]] and lost[0]["facts"] == [
        "24",
        "twenty-four",
    ]


def test_eval_facts_on_the_command_line_prints_the_lost_answers(folders, monkeypatch, capsys):
    from lorakit.cli import main
    from lorakit.data.builtin import GENERAL_FACTS

    replies = [f"It is {facts[0]}." for facts in GENERAL_FACTS.values()]
    replies[0] = "I do not know."
    monkeypatch.setattr(evaluation, "greedy_answers", lambda *a: replies)
    args = ["eval", "--model", str(folders / "model"), "--adapter", str(folders / "tuned")]
    assert main([*args, "--dataset", "identity", "--limit", "2", "--facts"]) == 0
    out = capsys.readouterr().out
    assert "facts_kept" in out and "93.8%" in out  # 15 of 16
    assert "1 of 16 factual answers lost their fact" in out and "I do not know." in out
