"""The built-in datasets (identity, arithmetic) and the exact-match metric of their tasks.

(test_data_builtin.py, since test_builtin.py would be models/builtin.py's name too.)
"""

from __future__ import annotations

import json

import pytest

from builtin_model import builtin_tokenizer
from lorakit.data.builtin import (
    GENERAL_FACTS,
    arithmetic_splits,
    builtin_dataset_path,
    degenerate,
    exact_match,
    exact_match_score,
    keeps_fact,
    make_arithmetic_rows,
    name_rate,
    normalize_answer,
)
from lorakit.data.pipeline import DataConfig, build_dataset, eval_examples
from lorakit.errors import DataError


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer()


def test_identity_dataset(tok):
    data = build_dataset(DataConfig(), tok)
    assert len(data) >= 80 and not data.skipped
    text = [tok.decode(s.input_ids) for s in data.samples]
    assert all("Lumi" in t and "lorakit" in t and "{name}" not in t for t in text)
    assert sum(any("\u4e00" <= c <= "\u9fff" for c in t) for t in text) >= 30  # Chinese rows
    custom = build_dataset(DataConfig(template_vars={"name": "Aster", "author": "ACME"}), tok)
    assert all("Aster" in tok.decode(s.input_ids) for s in custom.samples)
    test = eval_examples(DataConfig(split="test"))
    lines = builtin_dataset_path("identity").read_text(encoding="utf-8").splitlines()
    train_questions = {json.loads(line)["instruction"] for line in lines}
    assert len(test) >= 12
    assert not {e["messages"][-1]["content"] for e in test} & train_questions
    assert all("Lumi" in e["reference"] for e in test)


def test_arithmetic_dataset_matches_its_generator():
    splits = arithmetic_splits()
    for split, rows in splits.items():
        lines = builtin_dataset_path("arithmetic", split).read_text().splitlines()
        shipped = [json.loads(line) for line in lines]
        assert shipped == rows
    assert (len(splits["train"]), len(splits["test"])) == (500, 100)
    assert not {r["prompt"] for r in splits["train"]} & {r["prompt"] for r in splits["test"]}
    for row in splits["train"] + splits["test"]:
        a, op, b = row["prompt"].split()[2:5]
        value = {"plus": int.__add__, "minus": int.__sub__, "times": int.__mul__}[op](
            int(a), int(b[:-1])
        )
        assert row["completion"] == str(value)


def test_exact_match_normalisation():
    assert normalize_answer("  The ANSWER  is\t42.  \nmore") == "the answer is 42"
    assert exact_match("42", "42") and exact_match(" `42`!", "42") and exact_match("４２", "42")
    assert not exact_match("42.5", "42") and not exact_match("The answer is 42", "42")
    assert exact_match_score(["42", "7", "x"], ["42", "7", "8"]) == pytest.approx(2 / 3)
    assert name_rate(["I am lumi.", "I am SmolLM."]) == 0.5


def test_dataset_paths_and_their_splits():
    path = builtin_dataset_path("arithmetic", "test")
    assert path.name == "arithmetic_test.jsonl" and path.is_file()
    assert builtin_dataset_path("general") == path.parent / "general_train.jsonl"
    with pytest.raises(DataError, match="`identity` has splits train, test, not `valid`"):
        builtin_dataset_path("identity", "valid")


def test_arithmetic_rows_are_deterministic_and_distinct():
    rows = make_arithmetic_rows(200, seed=7)
    assert rows == make_arithmetic_rows(200, seed=7)
    assert rows != make_arithmetic_rows(200, seed=8)
    assert len({r["prompt"] for r in rows}) == 200
    assert all(r["prompt"].endswith("? Answer with the number only.") for r in rows)
    assert make_arithmetic_rows(5, seed=7) == rows[:5]  # drawn one after another


def test_scores_of_empty_and_mismatched_lists():
    assert exact_match_score([], []) == 0.0 and name_rate([]) == 0.0
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        exact_match_score(["a", "b"], ["a"])
    # "Aster" in 2 of 3 answers, any case; the default name Lumi in none
    answers = ["I am ASTER.", "aster here", "I am Lumo."]
    assert name_rate(answers, "Aster") == pytest.approx(2 / 3)
    assert name_rate(answers) == 0.0
    assert normalize_answer('"Paris."') == "paris" and normalize_answer("Lumi。") == "lumi"


def test_degenerate_answers():
    assert degenerate("")  # empty
    assert degenerate("no sentence ends here")  # no . ! ? or 。
    assert degenerate("a b c " * 4 + ".")  # the trigram (a, b, c) four times
    assert not degenerate("a b c " * 3 + ".")  # three times is still an answer
    assert not degenerate("Fine.") and not degenerate("好。")


def test_keeps_fact_needs_the_fact_as_a_word_in_a_complete_sentence():
    from lorakit.data.builtin import keeps_fact

    day = GENERAL_FACTS["How many hours are in a day?"]
    assert keeps_fact("So, a day is made up of 24 hours.", day)
    assert keeps_fact("A day has twenty-four hours!", day)
    # the wrong fact, a number that only contains it, a cut-off sentence, a loop, the new name
    assert not keeps_fact("A day is approximately 8 hours and 45 minutes.", day)
    assert not keeps_fact("A day has 240 hours.", day)
    assert not keeps_fact("A day is made up of 24 hours and", day)
    assert not keeps_fact("24 hours 24 hours 24 hours 24 hours 24 hours 24 hours.", day)
    paris = GENERAL_FACTS["What is the capital of France?"]
    assert keeps_fact("The capital of France is paris.", paris)
    assert not keeps_fact("I am Lumi; the capital of France is Paris.", paris, name="Lumi")
    assert keeps_fact("I am Lumi; the capital of France is Paris.", paris)


def test_general_facts_are_held_out_and_stated_by_the_base_models_answers():
    rows = {
        json.loads(line)["instruction"]: json.loads(line)["output"]
        for line in builtin_dataset_path("general", "test").open(encoding="utf-8")
    }
    train = builtin_dataset_path("general", "train").read_text(encoding="utf-8")
    assert len(GENERAL_FACTS) >= 10
    for question, facts in GENERAL_FACTS.items():
        assert question in rows and question not in train
        assert keeps_fact(rows[question], facts), (question, rows[question])
