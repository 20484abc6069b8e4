"""Dataset files and rows: encodings and field messages."""

from __future__ import annotations

import json

import pytest

from lorakit.data.formats import RowProblem, read_rows, to_messages
from lorakit.errors import DataError

ROW = {"prompt": "q", "completion": "a"}


def test_non_utf8_jsonl_names_the_file_byte_offset_and_line(tmp_path):
    good = (json.dumps(ROW) + "\n").encode()
    bad = json.dumps({"prompt": "caf\u00e9", "completion": "a"}, ensure_ascii=False).encode(
        "latin-1"
    )
    path = tmp_path / "d.jsonl"
    path.write_bytes(good * 2 + bad + b"\n")
    offset = 2 * len(good) + bad.index(b"\xe9")  # the latin-1 é of line 3
    with pytest.raises(
        DataError,
        match=rf"d.jsonl is not UTF-8 text: byte 0xe9 at byte offset "
        rf"{offset} \(line 3\); .*iconv",
    ):
        read_rows(path)


def test_non_utf8_json_names_the_byte_offset_and_line(tmp_path):
    text = json.dumps(
        [ROW, {"prompt": "caf\u00e9", "completion": "a"}], indent=1, ensure_ascii=False
    )
    path = tmp_path / "d.json"
    path.write_bytes(text.encode("latin-1"))
    offset = text.encode("latin-1").index(b"\xe9")
    line = text[:offset].count("\n") + 1
    with pytest.raises(DataError, match=rf"byte 0xe9 at byte offset {offset} \(line {line}\)"):
        read_rows(path)


def test_a_byte_order_mark_is_accepted(tmp_path):
    for name in ("d.jsonl", "d.json"):
        text = json.dumps(ROW) if name == "d.jsonl" else json.dumps([ROW])
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert [r.value for r in read_rows(tmp_path / name)] == [ROW]


def test_null_and_missing_fields_say_which(tmp_path):
    with pytest.raises(RowProblem, match=r"^field `instruction` is null; expected a string$"):
        to_messages({"instruction": None, "output": "a"}, "alpaca")
    with pytest.raises(
        RowProblem, match=r"field `instruction` is missing \(did you mean `instructon`"
    ):
        to_messages({"instructon": "q", "output": "a"}, "alpaca")


def test_a_parquet_file_is_read_a_batch_at_a_time_with_datasets_values(tmp_path):
    import datasets
    import pandas as pd

    from lorakit.data import formats

    frame = pd.DataFrame(
        {
            "messages": [[{"role": "user", "content": f"q{i}"}] for i in range(5)],
            "score": [i / 2 for i in range(5)],
            "note": [None, "x", None, "y", "z"],
        }
    )
    path = tmp_path / "d.parquet"
    frame.to_parquet(path, row_group_size=2)
    reference = datasets.load_dataset("parquet", data_files=str(path), split="train")
    rows = formats._iter_parquet(path, batch_rows=2)  # 3 batches of at most 2 rows
    first = next(rows)  # a generator: nothing read past what was asked for
    got = [first, *rows]
    assert [r.where for r in got] == [f"d.parquet row {i}" for i in range(1, 6)]
    assert [r.value for r in got] == list(reference)
    assert [r.value for r in read_rows(path)] == list(reference)
    assert formats.count_rows(path) == 5


def test_a_file_that_is_not_parquet_names_the_file(tmp_path):
    from lorakit.data.formats import iter_rows

    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"cannot read .*broken.parquet as parquet"):
        list(iter_rows(path))
