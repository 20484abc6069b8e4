"""Tokenizing rows in chunks, over several processes, in file order, with progress.

One row goes through `convert_row` (format → messages, template variables, system prompt) and
`encode_row` (chat template → ids and response-only labels, truncation); a chunk of rows
becomes a `store.Chunk` of flat arrays plus its bad rows. `tokenize_chunks` runs chunks in
this process (`num_proc=1`) or in forked worker processes, a bounded number in flight, so the
rows read and the results waiting stay a few chunks whatever the file's size, and yields them
in file order: the store and the bad-row report are the same for any `num_proc`.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from lorakit.data.formats import RawRow, RowProblem, fill_variables, rename_columns, to_messages
from lorakit.data.store import Chunk
from lorakit.data.tokenize import (
    IGNORE_INDEX,
    encode_conversation,
    encode_text,
    finish_labels,
    supervised_count,
    truncate,
)

CHUNK_ROWS = 256  # rows per task sent to a worker
_IN_FLIGHT = 3  # chunks queued per worker
_PROGRESS_EVERY = 5.0  # seconds between progress lines


@dataclass
class EncodeJob:
    """Everything a worker needs to turn rows into samples."""

    config: Any  # DataConfig
    tokenizer: Any
    template: str
    fmt: str
    variables: dict[str, str]


def convert_row(job: EncodeJob, value: Any) -> Any:
    """A row's value → messages (or text for the `text` format) or a RowProblem."""
    if isinstance(value, RowProblem):
        return value
    if isinstance(value, dict):
        value = fill_variables(rename_columns(value, job.config.columns), job.variables)
    try:
        converted: Any = to_messages(value, job.fmt)
    except RowProblem as problem:
        return problem
    system = job.config.system_prompt
    if system and isinstance(converted, list) and converted[0]["role"] != "system":
        converted = [{"role": "system", "content": system}, *converted]
    return converted


def encode_row(job: EncodeJob, conversation: Any) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated) of one converted row; RowProblem if nothing is trained."""
    config, tokenizer = job.config, job.tokenizer
    if isinstance(conversation, RowProblem):
        raise conversation
    if isinstance(conversation, str):
        ids, labels = encode_text(tokenizer, conversation)
    else:
        ids, labels = encode_conversation(tokenizer, job.template, conversation, config.train_on)
    ids, labels, cut = truncate(ids, labels, config.max_length, config.truncation)
    labels = finish_labels(labels)
    if supervised_count(labels) == 0:
        why = f" after truncation to max_length={config.max_length}" if cut else ""
        raise RowProblem(f"no token is left to train on{why}")
    return ids, labels, cut


def encode_chunk(job: EncodeJob, rows: list[RawRow]) -> Chunk:
    """One chunk of rows → flat arrays of the usable samples, and the report of the others."""
    ids: list[int] = []
    trained: list[bool] = []
    lengths, where, problems = [], [], []
    truncated = unreadable = 0
    raw_text = False
    for row in rows:
        conversation = convert_row(job, row.value)
        unreadable += isinstance(conversation, RowProblem)
        raw_text = raw_text or isinstance(conversation, str)
        try:
            sample_ids, labels, cut = encode_row(job, conversation)
        except RowProblem as problem:
            problems.append(f"{row.where}: {problem}")
            continue
        truncated += cut
        ids += sample_ids
        trained += [label != IGNORE_INDEX for label in labels]
        lengths.append(len(sample_ids))
        where.append(row.where)
    return Chunk(
        np.asarray(ids, dtype=np.int32),
        np.asarray(trained, dtype=np.uint8),
        np.asarray(lengths, dtype=np.int64),
        where,
        problems,
        len(rows),
        truncated,
        unreadable,
        raw_text,
    )


_JOB: EncodeJob | None = None  # a worker's job, set once when it starts


def _start_worker(job: EncodeJob) -> None:
    global _JOB
    _JOB = job


def _work(rows: list[RawRow]) -> Chunk:
    assert _JOB is not None
    return encode_chunk(_JOB, rows)


def default_num_proc() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def chunked(rows: Iterable[RawRow], size: int = CHUNK_ROWS) -> Iterator[list[RawRow]]:
    """Rows in lists of `size` (the last one shorter)."""
    chunk: list[RawRow] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def tokenize_chunks(
    job: EncodeJob, chunks: Iterable[list[RawRow]], num_proc: int
) -> Iterator[Chunk]:
    """Chunks encoded in order: here when num_proc is 1, else by `num_proc` forked workers."""
    if num_proc <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        for chunk in chunks:
            yield encode_chunk(job, chunk)
        return
    # the workers tokenize one text at a time: the tokenizer's own threads would only contend
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    context = multiprocessing.get_context("fork")
    with context.Pool(num_proc, initializer=_start_worker, initargs=(job,)) as pool:
        pending: deque[Any] = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_work, (chunk,)))
            if len(pending) >= num_proc * _IN_FLIGHT:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class Progress:
    """Rows done of about how many, rows per second and the time left, every few seconds."""

    def __init__(self, name: str, total: int | None, show: Callable[[str], None] | None):
        self.name, self.total, self.show = name, total, show
        self.start = self.last = time.perf_counter()
        self.done = 0

    def advance(self, rows: int) -> None:
        self.done += rows
        now = time.perf_counter()
        if self.show is None or now - self.last < _PROGRESS_EVERY:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        line = f"tokenizing {self.name}: {self.done:,}"
        if self.total:
            left = max(self.total - self.done, 0) / max(rate, 1e-9)
            line += f" of ~{self.total:,} rows ({rate:,.0f} rows/s, ~{_clock(left)} left)"
        else:
            line += f" rows ({rate:,.0f} rows/s)"
        self.show(line)

    def finish(self) -> str:
        """The closing line: rows and rate."""
        took = time.perf_counter() - self.start
        return f"tokenized {self.name}: {self.done:,} rows in {took:.1f} s"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
