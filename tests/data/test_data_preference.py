"""Preference pairs: every row form TRL accepts becomes the same (prompt, chosen, rejected),
labels cover the answer only, batches are the chosen rows then the rejected rows, and bad rows
are reported with file, row and problem."""

from __future__ import annotations

import json

import pytest

from builtin_model import builtin_tokenizer
from lorakit.data.pipeline import DataConfig, collate_batch, plan_epoch
from lorakit.data.preference import build_preference_dataset, check_pairs, load_pairs, to_pair
from lorakit.data.tokenize import IGNORE_INDEX
from lorakit.errors import DataError
from lorakit.models.templates import prompt_ids

USER = {"role": "user", "content": "What is 2+2?"}
GOOD = {"role": "assistant", "content": "4."}
BAD = {"role": "assistant", "content": "Well, hmm, maybe five."}


def _write(tmp_path, rows, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_row_forms_give_the_same_pair():
    expected = ([USER], [GOOD], [BAD])
    strings = {"prompt": USER["content"], "chosen": GOOD["content"], "rejected": BAD["content"]}
    conversational = {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}
    dialogues = {"chosen": [USER, GOOD], "rejected": [USER, BAD]}
    hh_text = {
        "chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4.",
        "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: Well, hmm, maybe five.",
    }
    for row in (strings, conversational, dialogues, hh_text):
        assert to_pair(row) == expected, row


def test_shared_dialogue_turns_become_the_prompt():
    earlier = [USER, GOOD, {"role": "user", "content": "And 3+3?"}]
    row = {
        "chosen": [*earlier, {"role": "assistant", "content": "6."}],
        "rejected": [*earlier, {"role": "assistant", "content": "Seven-ish."}],
    }
    prompt, chosen, rejected = to_pair(row)
    assert prompt == earlier and chosen[0]["content"] == "6." and len(rejected) == 1


def test_labels_cover_the_answer_only(tmp_path):
    tokenizer = builtin_tokenizer()
    rows = [{"prompt": [USER, GOOD, USER], "chosen": [GOOD], "rejected": [BAD]}]
    config = DataConfig(dataset=str(_write(tmp_path, rows)))
    dataset = build_preference_dataset(config, tokenizer)
    pair = dataset.samples[0]
    prefix = prompt_ids(tokenizer, [USER, GOOD, USER], dataset_template(config, tokenizer))
    for side, answer in ((pair.chosen, GOOD), (pair.rejected, BAD)):
        assert side.input_ids[: len(prefix)] == prefix  # both sides share the prompt
        scored = [t for t in side.labels if t != IGNORE_INDEX]
        assert side.labels[: len(prefix)] == [IGNORE_INDEX] * len(prefix)  # the earlier 4. too
        assert tokenizer.decode(scored).startswith(answer["content"])
        assert side.input_ids[len(prefix) :][: len(scored)] == scored


def dataset_template(config, tokenizer):
    from lorakit.data.pipeline import prompt_template

    return prompt_template(config, tokenizer)


def test_a_batch_is_the_chosen_rows_then_the_rejected_rows(tmp_path):
    rows = [
        {"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": f"No idea {i}, sorry."}
        for i in range(5)
    ]
    dataset = build_preference_dataset(
        DataConfig(dataset=str(_write(tmp_path, rows))), builtin_tokenizer()
    )
    plan = plan_epoch(dataset, 2, shuffle=False)
    assert [len(b) for b in plan] == [2, 2, 1]
    batch = collate_batch(dataset, plan[0])
    ids = [pair_ids for row in plan[0] for pair_ids in row]
    assert batch["input_ids"].shape[0] == 4 and batch["sample_ids"] == plan[0]
    for k, i in enumerate(ids):
        n_c, n_r = (
            len(dataset.samples[i].chosen.input_ids),
            len(dataset.samples[i].rejected.input_ids),
        )
        assert batch["input_ids"][k, :n_c].tolist() == dataset.samples[i].chosen.input_ids
        assert batch["input_ids"][2 + k, :n_r].tolist() == dataset.samples[i].rejected.input_ids
        assert int(batch["attention_mask"][2 + k].sum()) == n_r


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"prompt": "Hi?", "chosen": "Hello."}, "field `rejected` is missing"),
        ({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Hello."}, "are the same answer"),
        ({"prompt": "Hi?", "chosen": "", "rejected": "Go."}, "field `chosen` is empty"),
        ({"chosen": "Hello.", "rejected": "Go."}, "no `prompt`"),
        ({"prompt": "Hi?", "chosen": 3, "rejected": "Go."}, "must be a string or a list"),
    ],
)
def test_bad_rows_name_file_row_and_problem(tmp_path, row, problem):
    good = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}
    path = _write(tmp_path, [good, row, good])
    with pytest.raises(DataError) as err:
        build_preference_dataset(DataConfig(dataset=str(path)), builtin_tokenizer())
    assert "pairs.jsonl line 2" in str(err.value) and problem in str(err.value)
    assert "line 1" not in str(err.value)


def test_an_over_long_prompt_is_named(tmp_path):
    rows = [{"prompt": "word " * 80, "chosen": "Yes.", "rejected": "No."}]
    path = _write(tmp_path, rows)
    with pytest.raises(DataError, match=r"line 1: the prompt takes all of data.max_length=32"):
        build_preference_dataset(DataConfig(dataset=str(path), max_length=32), builtin_tokenizer())


def test_columns_map_other_names_and_packing_is_refused(tmp_path):
    rows = [{"question": "Hi?", "good": "Hello.", "bad": "Go away."}]
    path = _write(tmp_path, rows)
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    dataset = build_preference_dataset(
        DataConfig(dataset=str(path), columns=columns), builtin_tokenizer()
    )
    assert len(dataset) == 1 and dataset.summary().startswith("pairs.jsonl: 1 of 1 preference")
    with pytest.raises(DataError, match="set data.packing: false"):
        build_preference_dataset(DataConfig(dataset=str(path), packing=True), builtin_tokenizer())


def test_check_pairs_refuses_a_supervised_file(tmp_path):
    path = _write(tmp_path, [{"prompt": "Hi?", "completion": "Hello."}])
    with pytest.raises(DataError, match="none of its 1 rows is a usable preference pair"):
        check_pairs(DataConfig(dataset=str(path)))
    check_pairs(DataConfig(dataset="concise"))


def test_the_builtin_concise_pairs_build(tmp_path):
    train = build_preference_dataset(DataConfig(dataset="concise"), builtin_tokenizer())
    test = build_preference_dataset(
        DataConfig(dataset="concise", split="test"), builtin_tokenizer()
    )
    assert len(train) == 32 and len(test) == 8 and not train.skipped
    prompts = {
        split: {
            p[0][0]["content"] for _, p in load_pairs(DataConfig(dataset="concise", split=split))[1]
        }
        for split in ("train", "test")
    }
    assert len(prompts["train"]) == 32 and not prompts["train"] & prompts["test"]


def test_the_data_formats_page_rows_are_pairs():
    from pathlib import Path

    page = (Path(__file__).parents[2] / "docs" / "data-formats.md").read_text()
    section = page.split("## Preference pairs")[1].split("\n## ")[0]
    blocks = section.split("```json\n")[1:]
    assert len(blocks) == 3
    for block in blocks:
        prompt, chosen, rejected = to_pair(json.loads(block.split("\n```")[0]))
        assert prompt[-1]["content"] == "Capital of Italy?" and chosen[0]["content"] == "Rome."
        assert rejected != chosen
