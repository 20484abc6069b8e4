"""Chunks of rows tokenized in this process or in forked workers: the same arrays and reports in
file order, a bounded number of rows read ahead, errors carried back, progress lines."""

from __future__ import annotations

import numpy as np
import pytest

from builtin_model import builtin_tokenizer
from lorakit.data import parallel
from lorakit.data.formats import RawRow, RowProblem
from lorakit.data.parallel import (
    CHUNK_ROWS,
    EncodeJob,
    Progress,
    chunked,
    default_num_proc,
    encode_chunk,
    encode_row,
    tokenize_chunks,
)
from lorakit.data.pipeline import DataConfig, prompt_template
from lorakit.data.tokenize import IGNORE_INDEX


@pytest.fixture(scope="module")
def job():
    tok = builtin_tokenizer()
    config = DataConfig(max_length=48)
    return EncodeJob(config, tok, prompt_template(config, tok), "prompt_completion", {})


def rows(n: int) -> list[RawRow]:
    out = []
    for i in range(n):
        value = {"prompt": f"Question {i}? " * (1 + i % 7), "completion": f"Answer {i}."}
        if i % 10 == 3:
            value = {"prompt": "no completion"}
        if i % 10 == 7:
            value = RowProblem("invalid JSON (Expecting value at column 1)")
        out.append(RawRow(i + 1, f"d.jsonl line {i + 1}", value))
    return out


def test_a_chunk_holds_each_row_as_encode_row_makes_it(job):
    chunk = encode_chunk(job, rows(20))
    assert chunk.rows == 20 and chunk.unreadable == 4 and not chunk.raw_text
    expected, problems, truncated = [], [], 0
    for row in rows(20):
        try:
            ids, labels, cut = encode_row(job, parallel.convert_row(job, row.value))
        except RowProblem as problem:
            problems.append(f"{row.where}: {problem}")
            continue
        expected.append((row.where, ids, labels))
        truncated += cut
    assert chunk.problems == problems and len(problems) > 4  # unreadable, too long
    assert "d.jsonl line 8: invalid JSON (Expecting value at column 1)" in problems
    assert chunk.where == [where for where, _, _ in expected]
    at = 0
    for (_, ids, labels), length in zip(expected, chunk.lengths, strict=True):
        assert chunk.ids[at : at + length].tolist() == ids
        trained = chunk.trained[at : at + length].astype(bool)
        assert np.array_equal(trained, np.array(labels) != IGNORE_INDEX)
        at += length
    assert chunk.truncated == truncated and at == len(chunk.ids)


def test_two_workers_give_the_chunks_of_one_in_file_order(job):
    one = list(tokenize_chunks(job, chunked(rows(700), 64), num_proc=1))
    two = list(tokenize_chunks(job, chunked(rows(700), 64), num_proc=2))
    assert len(one) == len(two) == 11
    for a, b in zip(one, two, strict=True):
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.trained, b.trained)
        assert (a.where, a.problems, a.truncated) == (b.where, b.problems, b.truncated)


def test_workers_read_only_a_few_chunks_ahead(job):
    pulled = []

    def source():
        for chunk in chunked(rows(64 * 40), 64):
            pulled.append(len(chunk))
            yield chunk

    results = tokenize_chunks(job, source(), num_proc=2)
    next(results)
    assert len(pulled) == 2 * parallel._IN_FLIGHT  # not all 40 chunks
    assert sum(1 for _ in results) == 39


def test_an_error_in_a_worker_reaches_the_caller(job):
    broken = EncodeJob(job.config, None, job.template, "prompt_completion", {})
    with pytest.raises(AttributeError):
        list(tokenize_chunks(broken, chunked(rows(200), 50), num_proc=2))


def test_chunked_and_default_num_proc():
    sizes = [len(c) for c in chunked(rows(2 * CHUNK_ROWS + 5))]
    assert sizes == [CHUNK_ROWS, CHUNK_ROWS, 5]
    assert default_num_proc() >= 1


def test_progress_lines(monkeypatch):
    clock = iter([0.0, 10.0, 12.0, 20.0, 20.0])
    monkeypatch.setattr(parallel.time, "perf_counter", lambda: next(clock))
    lines = []
    shown = Progress("d.jsonl", 1000, lines.append)
    shown.advance(100)  # at 10 s: 10 rows/s, 900 left
    shown.advance(100)  # at 12 s: too soon for another line
    shown.advance(100)  # at 20 s
    assert lines == [
        "tokenizing d.jsonl: 100 of ~1,000 rows (10 rows/s, ~1m30s left)",
        "tokenizing d.jsonl: 300 of ~1,000 rows (15 rows/s, ~46s left)",
    ]
    assert shown.finish() == "tokenized d.jsonl: 300 rows in 20.0 s"
