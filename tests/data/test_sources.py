"""Folders as datasets: shards read in name order with their own row names, save_to_disk folders
(a dataset and a dataset dict's split), the digest over every file, and the refusals."""

from __future__ import annotations

import json

import pytest

from builtin_model import builtin_tokenizer
from lorakit.data.pipeline import DataConfig, build_dataset
from lorakit.data.sources import count_source, iter_source, source_digest
from lorakit.errors import DataError


def rows(start: int, n: int) -> list[dict[str, str]]:
    return [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(start, n)]


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(r) + "\n" for r in items))


@pytest.fixture
def shard_folder(tmp_path):
    import pandas as pd

    folder = tmp_path / "shards"
    folder.mkdir()
    write_jsonl(folder / "part-0.jsonl", rows(0, 3))
    pd.DataFrame(rows(3, 5)).to_parquet(folder / "part-1.parquet")
    (folder / "README.md").write_text("not a shard")
    return folder


def test_a_folder_of_shards_reads_each_file_in_order(shard_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_DATA_CACHE", str(tmp_path / "cache"))
    got = list(iter_source(shard_folder))
    assert [r.where for r in got] == [
        "part-0.jsonl line 1",
        "part-0.jsonl line 2",
        "part-0.jsonl line 3",
        "part-1.parquet row 1",
        "part-1.parquet row 2",
    ]
    assert [r.value["prompt"] for r in got] == [f"Question {i}?" for i in range(5)]
    assert count_source(shard_folder) == 5  # 3 lines, and the parquet file's row count
    tok = builtin_tokenizer()
    data = build_dataset(DataConfig(dataset=str(shard_folder)), tok)
    write_jsonl(tmp_path / "all.jsonl", rows(0, 5))
    whole = build_dataset(DataConfig(dataset=str(tmp_path / "all.jsonl")), tok)
    assert [s.input_ids for s in data.samples] == [s.input_ids for s in whole.samples]
    assert [s.labels for s in data.samples] == [s.labels for s in whole.samples]
    before = source_digest(shard_folder)
    write_jsonl(shard_folder / "part-0.jsonl", rows(0, 2))  # a changed shard: another key
    assert source_digest(shard_folder) != before
    assert len(build_dataset(DataConfig(dataset=str(shard_folder)), tok)) == 4


def test_a_folder_without_shards_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .jsonl / .json / .csv / .parquet file"):
        list(iter_source(tmp_path / "empty"))


def test_save_to_disk_folders(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("LORAKIT_DATA_CACHE", str(tmp_path / "cache"))
    datasets.Dataset.from_list(rows(0, 3)).save_to_disk(str(tmp_path / "one"))
    both = {"train": rows(0, 2), "test": rows(5, 6)}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in both.items()}).save_to_disk(
        str(tmp_path / "dict")
    )
    assert [r.where for r in iter_source(tmp_path / "one")] == [
        "one row 1",
        "one row 2",
        "one row 3",
    ]
    test = list(iter_source(tmp_path / "dict", "test"))
    assert [(r.where, r.value["prompt"]) for r in test] == [("dict row 1", "Question 5?")]
    with pytest.raises(DataError, match="holds the splits train, test, not `valid`"):
        list(iter_source(tmp_path / "dict", "valid"))
    tok = builtin_tokenizer()
    data = build_dataset(DataConfig(dataset=str(tmp_path / "dict"), split="test"), tok)
    assert [s.where for s in data.samples] == ["dict row 1"]
    assert "Answer 5." in tok.decode(data.samples[0].input_ids)
