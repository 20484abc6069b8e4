"""Data formats on the real SmolLM2 tokenizer: golden masks, truncation, bad rows, inspect.

The built-in datasets and exact match: test_data_builtin.py.
"""

from __future__ import annotations

import copy
import json

import pytest

from builtin_model import builtin_tokenizer
from lorakit.data.builtin import builtin_dataset_path
from lorakit.data.pipeline import IGNORE_INDEX, DataConfig, build_dataset, inspect_dataset
from lorakit.errors import DataError

SYSTEM = (
    "<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def spans(tok, sample):
    """Decoded runs of supervised tokens."""
    out, run = [], []
    for token, label in zip(sample.input_ids, sample.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(token)
        elif run:
            out.append(tok.decode(run))
            run = []
    return out + ([tok.decode(run)] if run else [])


def one(tok, tmp_path, row, **config):
    data = build_dataset(
        DataConfig(dataset=write_jsonl(tmp_path / "d.jsonl", [row]), **config), tok
    )
    return data.samples[0]


# Golden masks: the whole text is the template's rendering, and the supervised tokens are
# exactly the assistant contents followed by <|im_end|>\n.
def test_prompt_completion_mask(tok, tmp_path):
    sample = one(tok, tmp_path, {"prompt": "Capital of France?", "completion": "Paris."})
    assert tok.decode(sample.input_ids) == (
        SYSTEM + "<|im_start|>user\nCapital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n"
    )
    assert spans(tok, sample) == ["Paris.<|im_end|>\n"]


def test_alpaca_mask_with_input_system_and_history(tok, tmp_path):
    row = {
        "instruction": "Translate.",
        "input": "bonjour",
        "output": "hello",
        "system": "Be brief.",
        "history": [["Hi", "Hey there!"]],
    }
    sample = one(tok, tmp_path, row)
    assert tok.decode(sample.input_ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHey there!<|im_end|>\n"
        "<|im_start|>user\nTranslate.\n\nbonjour<|im_end|>\n"
        "<|im_start|>assistant\nhello<|im_end|>\n"
    )
    assert spans(tok, sample) == ["Hey there!<|im_end|>\n", "hello<|im_end|>\n"]


def test_sharegpt_mask_multi_turn(tok, tmp_path):
    turns = [("human", "2+2?"), ("gpt", "4"), ("human", "times 3?"), ("gpt", "12, since 4×3=12.")]
    sample = one(tok, tmp_path, {"conversations": [{"from": f, "value": v} for f, v in turns]})
    assert spans(tok, sample) == ["4<|im_end|>\n", "12, since 4×3=12.<|im_end|>\n"]


def test_messages_mask_chinese(tok, tmp_path):
    messages = [
        {"role": "system", "content": "你是助手。"},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮您？"},
    ]
    sample = one(tok, tmp_path, {"messages": messages})
    assert tok.decode(sample.input_ids).startswith("<|im_start|>system\n你是助手。")
    assert spans(tok, sample) == ["你好！有什么可以帮您？<|im_end|>\n"]


def test_text_format_trains_on_every_token_but_the_first(tok, tmp_path):
    sample = one(tok, tmp_path, {"text": "Plain text to learn."})
    assert tok.decode(sample.input_ids) == "Plain text to learn.<|im_end|>"
    assert sample.labels[0] == IGNORE_INDEX
    assert sample.labels[1:] == sample.input_ids[1:]


def test_train_on_all(tok, tmp_path):
    sample = one(tok, tmp_path, {"prompt": "a", "completion": "b"}, train_on="all")
    assert sample.labels == [IGNORE_INDEX] + sample.input_ids[1:]


def test_plain_template_for_base_models(tok, tmp_path):
    sample = one(tok, tmp_path, {"prompt": "Say hi.", "completion": "Hi!"}, template="plain")
    assert tok.decode(sample.input_ids) == (
        "<|im_start|>### Instruction:\nSay hi.\n\n### Response:\nHi!<|im_end|>"
    )
    assert spans(tok, sample) == ["Hi!<|im_end|>"]


def test_tokenizer_without_chat_template_gets_the_plain_template(tok, tmp_path):
    base = copy.deepcopy(tok)
    base.chat_template = None
    sample = one(base, tmp_path, {"prompt": "Say hi.", "completion": "Hi!"})
    assert tok.decode(sample.input_ids).startswith("<|im_start|>### Instruction:\nSay hi.")
    with pytest.raises(DataError, match="no chat template"):
        one(base, tmp_path, {"prompt": "Say hi.", "completion": "Hi!"}, template="chat")


def test_template_errors_are_row_reports(tok, tmp_path):
    strict = copy.deepcopy(tok)
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('no system role') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    row = {
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"},
        ]
    }
    with pytest.raises(
        DataError, match="d.jsonl line 1: the chat template refuses.*no system role"
    ):
        one(strict, tmp_path, row)


def test_system_prompt_and_column_mapping(tok, tmp_path):
    row = {"question": "Why?", "answer": "Because."}
    sample = one(
        tok,
        tmp_path,
        row,
        columns={"prompt": "question", "completion": "answer"},
        system_prompt="Answer shortly.",
    )
    assert tok.decode(sample.input_ids).startswith("<|im_start|>system\nAnswer shortly.<|im_end|>")
    assert spans(tok, sample) == ["Because.<|im_end|>\n"]


def test_column_mapping_checks_field_names():
    with pytest.raises(ValueError, match="did you mean `completion`"):
        DataConfig(columns={"completon": "answer"})


def test_unknown_columns_name_the_formats(tok, tmp_path):
    with pytest.raises(DataError, match="cannot tell the dataset format"):
        one(tok, tmp_path, {"question": "Why?", "answer": "Because."})


def test_truncation_right_and_left(tok, tmp_path):
    row = {"prompt": "word " * 60, "completion": "The end."}
    with pytest.raises(DataError, match="line 1: no token is left to train on after truncation"):
        one(tok, tmp_path, row, max_length=32)
    sample = one(tok, tmp_path, row, max_length=32, truncation="left")
    assert len(sample.input_ids) == 32
    assert spans(tok, sample) == ["The end.<|im_end|>\n"]


def test_csv_parquet_and_json_files(tok, tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"prompt": ["a?", "b?"], "completion": ["A", "B"]})
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(frame.to_dict("records")))
    for name in ("d.csv", "d.parquet", "d.json"):
        data = build_dataset(DataConfig(dataset=str(tmp_path / name)), tok)
        assert [spans(tok, s) for s in data.samples] == [["A<|im_end|>\n"], ["B<|im_end|>\n"]]


# Bad rows: every kind is reported with its file and line.
GOOD = {"prompt": "q", "completion": "a"}
BAD_ROWS = [
    ('{"prompt": "q", "completion": ', "d.jsonl line 2: invalid JSON"),
    ({"prompt": "q"}, "d.jsonl line 2: field `completion` is missing"),
    ({"prompt": "q", "completion": "  "}, "d.jsonl line 2: field `completion` is empty"),
    ({"prompt": "q", "completion": 5}, "d.jsonl line 2: field `completion` must be a string"),
    (
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
        "d.jsonl line 2: message 1 has role `assistant` where `user` was expected",
    ),
    (
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ["a"]}]},
        "d.jsonl line 2: message 2 \\(assistant\\): content must be a string, found list",
    ),
    ({"prompt": "q " * 80, "completion": "a"}, "d.jsonl line 2: no token is left to train on"),
    ({"messages": [{"role": "user", "content": "q"}]}, "line 2: the conversation must end"),
    ([1, 2], "d.jsonl line 2: expected an object"),
]


@pytest.mark.parametrize("bad, report", BAD_ROWS)
def test_bad_row_reports(tok, tmp_path, bad, report):
    # the first row sets the detected format, so it is a good row of the bad row's format
    first = (
        GOOD
        if "prompt" in str(bad)
        else {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    )
    path = write_jsonl(tmp_path / "d.jsonl", [first, bad, first])
    with pytest.raises(DataError, match=report):
        build_dataset(DataConfig(dataset=path, max_length=64), tok)


def test_skip_respects_the_cap(tok, tmp_path):
    rows = [GOOD] * 9 + ["{not json"]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = build_dataset(DataConfig(dataset=path, bad_rows="skip", max_skipped_share=0.1), tok)
    assert len(data) == 9 and data.skipped == [
        "d.jsonl line 10: invalid JSON "
        "(Expecting property name enclosed in double quotes at column 2)"
    ]
    assert data.summary().startswith("d.jsonl: 9 of 10 rows used, 1 skipped")
    assert f"{data.supervised_tokens()} supervised" in data.summary()
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 8 + ["{", {"prompt": "q"}])
    with pytest.raises(DataError, match=r"2 of 10 rows \(20%\).*max_skipped_share=0.1"):
        build_dataset(DataConfig(dataset=path, bad_rows="skip", max_skipped_share=0.1), tok)


def test_no_supervised_token_is_an_error(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q " * 80, "completion": "a"}] * 2)
    with pytest.raises(DataError, match="no supervised token"):
        build_dataset(
            DataConfig(dataset=path, max_length=32, bad_rows="skip", max_skipped_share=1.0), tok
        )


def test_missing_file_and_unknown_builtin():
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(DataConfig(dataset="nope.jsonl"), None)
    with pytest.raises(DataError, match="did you mean `identity`"):
        builtin_dataset_path("identiy")


def test_inspect_marks_supervised_tokens(tok):
    report = inspect_dataset(DataConfig(dataset="arithmetic"), tok, n=2)
    assert report.count("⟦") == 2 and "⟦14<|im_end|>\n⟧" in report
    assert "500 of 500 rows used" in report and "padding at batch size 8, packed" in report


def test_a_checked_file_is_not_read_again_until_it_or_the_settings_change(tmp_path, monkeypatch):

    from lorakit.data import pipeline

    monkeypatch.setenv("LORAKIT_DATA_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reads = []
    real = pipeline.load_conversations
    monkeypatch.setattr(pipeline, "load_conversations", lambda c: reads.append(c) or real(c))
    config = DataConfig(dataset=str(path))
    pipeline.check_dataset(config)
    pipeline.check_dataset(config)  # passed before with the same file and settings: not read
    assert len(reads) == 1
    pipeline.check_dataset(DataConfig(dataset=str(path), limit=2))  # other row settings
    pipeline.check_dataset(DataConfig(dataset=str(path), cache=False))  # no memo without a cache
    assert len(reads) == 3
    path.write_text(path.read_text() + "{not json\n")  # the file changed: read, and refused
    with pytest.raises(DataError, match="d.jsonl line 5"):
        pipeline.check_dataset(config)
    with pytest.raises(DataError, match="d.jsonl line 5"):  # a failed check is not remembered
        pipeline.check_dataset(config)
