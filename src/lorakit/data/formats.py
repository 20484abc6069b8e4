"""Dataset files and row formats: read json / jsonl / csv / parquet rows, turn each into messages.

Every format becomes a conversation (a list of `{"role", "content"}` messages: an optional
system message, then user / assistant turns alternating, ending with an assistant turn), except
`text`, which stays raw text and is trained on whole.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import DataError, closest

FORMATS = ("auto", "text", "prompt_completion", "alpaca", "sharegpt", "messages", "preference")
FIELDS = (
    "text",
    "prompt",
    "completion",
    "instruction",
    "input",
    "output",
    "system",
    "history",
    "conversations",
    "messages",
    "chosen",
    "rejected",
)
FILE_TYPES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
}


class RowProblem(Exception):
    """A row that cannot be used; the message says why (the caller adds file and row)."""


@dataclass
class RawRow:
    """One row as read from a file: its 1-based number, where it is, and its content."""

    number: int
    where: str  # e.g. "train.jsonl line 7"
    value: Any  # a dict, or a RowProblem when the row could not even be parsed


def read_rows(path: str | Path) -> list[RawRow]:
    """Read a json / jsonl / csv / parquet file into rows, each with its file and row number."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"dataset file {path.absolute()} does not exist (a path in a config file is "
            "relative to that file's folder; on the command line, to the working directory)"
        )
    kind = FILE_TYPES.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"dataset file {path} has suffix `{path.suffix}`; expected one of "
            f"{', '.join(FILE_TYPES)}"
            + (
                "; turn a .txt file into `text` rows first (docs/data-formats.md shows how)"
                if path.suffix.lower() == ".txt"
                else ""
            )
        )
    if kind == "jsonl":
        return list(_iter_jsonl(path))
    if kind == "json":
        return _read_json(path)
    if kind == "parquet":
        return list(_iter_parquet(path))
    return _read_csv(path)


def iter_rows(path: str | Path) -> Iterator[RawRow]:
    """The rows of `read_rows`; a JSON-lines file read line by line and a Parquet file a
    thousand rows at a time as they are iterated (JSON and CSV files whole)."""
    path = Path(path)
    kind = FILE_TYPES.get(path.suffix.lower()) if path.is_file() else None
    if kind == "jsonl":
        return _iter_jsonl(path)
    if kind == "parquet":
        return _iter_parquet(path)
    return iter(read_rows(path))


def count_rows(path: str | Path) -> int | None:
    """About how many rows `iter_rows` yields (lines of a JSON-lines file, a Parquet file's
    row count); None for others."""
    path = Path(path)
    kind = FILE_TYPES.get(path.suffix.lower())
    if kind == "parquet" and path.is_file():
        return _parquet_file(path).metadata.num_rows
    if kind != "jsonl" or not path.is_file():
        return None
    lines, last = 0, b"\n"
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (last != b"\n")


def _decode(path: Path, data: bytes, offset: int = 0, line: int = 1) -> str:
    """UTF-8 text of `data`, the bytes of `path` from byte `offset` (on `line`) on; a leading
    BOM is dropped. DataError naming the file, byte offset and line of an undecodable byte."""
    try:
        return data.decode("utf-8-sig" if offset == 0 else "utf-8")
    except UnicodeDecodeError as err:
        line += data[: err.start].count(b"\n")
        raise DataError(
            f"{path} is not UTF-8 text: byte 0x{data[err.start]:02x} at byte offset "
            f"{offset + err.start} (line {line}); lorakit reads dataset files as UTF-8: convert "
            "it, e.g. `iconv -f latin1 -t utf-8`"
        ) from None


def _iter_jsonl(path: Path) -> Iterator[RawRow]:
    """JSON lines read one by one, so that a bad line is named by its line number."""
    offset = 0
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            line = _decode(path, raw, offset, number)
            offset += len(raw)
            if not line.strip():
                continue
            where = f"{path.name} line {number}"
            try:
                value: Any = json.loads(line)
            except json.JSONDecodeError as err:
                value = RowProblem(f"invalid JSON ({_json_reason(err)} at column {err.colno})")
            yield RawRow(number, where, value)


def _json_reason(err: json.JSONDecodeError) -> str:
    """json's reason without a trailing 'at' ("Unterminated string starting at"), so that the
    position can follow it once."""
    return err.msg.removesuffix(" at")


def _read_json(path: Path) -> list[RawRow]:
    """A JSON file holding a list of objects (or an object with one such list)."""
    try:
        data = json.loads(_decode(path, path.read_bytes()))
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: invalid JSON ({_json_reason(err)} at line {err.lineno}, column {err.colno})"
        ) from err
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a list of rows, or an object holding one list")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows, found {type(data).__name__}")
    return [RawRow(i, f"{path.name} item {i}", v) for i, v in enumerate(data, start=1)]


def _read_csv(path: Path) -> list[RawRow]:
    """A csv file through Hugging Face datasets; row numbers count data rows from 1."""
    import datasets

    try:
        table = datasets.load_dataset("csv", data_files=str(path), split="train")
    except Exception as err:  # datasets raises many kinds; the user needs the file and reason
        raise DataError(f"cannot read {path} as csv: {err}") from err
    return [RawRow(i, f"{path.name} row {i}", row) for i, row in enumerate(table, start=1)]


def _parquet_file(path: Path) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as err:  # pyarrow's errors name neither the file nor what to do
        raise DataError(f"cannot read {path} as parquet: {err}") from err


def _iter_parquet(path: Path, batch_rows: int = 1024) -> Iterator[RawRow]:
    """A Parquet file's rows a batch at a time (memory: one batch, not the file), as the
    Python values Hugging Face datasets gives for them; row numbers count from 1."""
    number = 0
    for batch in _parquet_file(path).iter_batches(batch_size=batch_rows):
        for row in batch.to_pylist():
            number += 1
            yield RawRow(number, f"{path.name} row {number}", row)


def detect_format(keys: set[str] | list[str]) -> str:
    """The format a row's keys imply: messages, sharegpt, alpaca, prompt_completion or text."""
    keys = set(keys)
    if "chosen" in keys and "rejected" in keys:
        return "preference"
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    raise DataError(
        f"cannot tell the dataset format from the columns {sorted(keys)}; expected `messages`, "
        "`conversations`, `instruction`+`output`, `prompt`+`completion` or `text`, or set "
        "data.format and map columns with data.columns"
    )


def rename_columns(row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """Apply a {lorakit field: file column} mapping to one row."""
    if not columns:
        return row
    renamed = {k: v for k, v in row.items() if k not in columns.values()}
    for field, column in columns.items():
        if column in row:
            renamed[field] = row[column]
    return renamed


def check_columns(columns: dict[str, str], key: str = "data.columns") -> dict[str, str]:
    """A {lorakit field: file column} mapping whose keys are all lorakit fields."""
    for field in columns:
        if field not in FIELDS:
            raise ValueError(
                f"{key} maps `{field}`, which is not a lorakit field{closest(field, FIELDS)}"
                f"; fields: {', '.join(FIELDS)} (write {{field: file column}})"
            )
    return columns


def check_format(fmt: str) -> str:
    """Validate a format name."""
    if fmt not in FORMATS:
        raise DataError(
            f"data format `{fmt}` is not one of {', '.join(FORMATS)}{closest(fmt, FORMATS)}"
        )
    return fmt


def to_messages(row: Any, fmt: str) -> list[dict[str, str]] | str:
    """One row as a validated conversation (or raw text for `text`); RowProblem if unusable."""
    if isinstance(row, RowProblem):
        raise row
    if not isinstance(row, dict):
        raise RowProblem(f"expected an object with fields, found {type(row).__name__}")
    if fmt == "text":
        return _string(row, "text")
    if fmt == "preference":
        raise RowProblem(
            "a preference pair (chosen / rejected) is not a supervised row; train it with "
            "method: dpo, orpo or simpo (docs/training.md)"
        )
    if fmt == "prompt_completion":
        messages = [
            {"role": "user", "content": _string(row, "prompt")},
            {"role": "assistant", "content": _string(row, "completion")},
        ]
    elif fmt == "alpaca":
        messages = _alpaca(row)
    elif fmt == "sharegpt":
        messages = _sharegpt(row)
    else:
        messages = _messages(row)
    check_conversation(messages)
    return messages


def _string(row: dict[str, Any], field: str, required: bool = True) -> str:
    """A string field of a row (stripped of nothing); RowProblem if missing, empty or not text."""
    value = row.get(field)
    if value is None:
        if required and field in row:
            raise RowProblem(f"field `{field}` is null; expected a string")
        if required:
            raise RowProblem(f"field `{field}` is missing{closest(field, list(row))}")
        return ""
    if not isinstance(value, str):
        raise RowProblem(f"field `{field}` must be a string, found {type(value).__name__}")
    if required and not value.strip():
        raise RowProblem(f"field `{field}` is empty")
    return value


def _alpaca(row: dict[str, Any]) -> list[dict[str, str]]:
    """instruction (+ input) → user, output → assistant; optional system and history pairs."""
    messages = []
    system = _string(row, "system", required=False)
    if system.strip():
        messages.append({"role": "system", "content": system})
    history = row.get("history") or []
    if not isinstance(history, list):
        raise RowProblem("field `history` must be a list of [instruction, response] pairs")
    for turn, pair in enumerate(history, start=1):
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            raise RowProblem(f"history turn {turn} must be an [instruction, response] pair")
        messages += [
            {"role": "user", "content": pair[0]},
            {"role": "assistant", "content": pair[1]},
        ]
    prompt = _string(row, "instruction")
    extra = _string(row, "input", required=False)
    if extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    messages += [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": _string(row, "output")},
    ]
    return messages


def _sharegpt(row: dict[str, Any]) -> list[dict[str, str]]:
    """`conversations` of {from, value} with from in human/gpt/system (user/assistant too)."""
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise RowProblem("field `conversations` must be a non-empty list of {from, value}")
    messages = []
    for i, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RowProblem(f"conversation turn {i} must be an object with `from` and `value`")
        role = _SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise RowProblem(
                f"conversation turn {i} has from=`{turn['from']}`; expected one of "
                f"{', '.join(_SHAREGPT_ROLES)}{closest(str(turn['from']), _SHAREGPT_ROLES)}"
            )
        messages.append({"role": role, "content": turn["value"]})
    return messages


def _messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """`messages` of {role, content}."""
    turns = row.get("messages")
    if not isinstance(turns, list) or not turns:
        raise RowProblem("field `messages` must be a non-empty list of {role, content}")
    messages = []
    for i, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise RowProblem(f"message {i} must be an object with `role` and `content`")
        messages.append({"role": turn["role"], "content": turn["content"]})
    return messages


def check_conversation(messages: list[dict[str, Any]]) -> None:
    """[system], user, assistant, user, assistant, ...: non-empty strings, ending with assistant."""
    start = 1 if messages and messages[0]["role"] == "system" else 0
    for i, message in enumerate(messages, start=1):
        content = message["content"]
        if not isinstance(content, str):
            raise RowProblem(
                f"message {i} ({message['role']}): content must be a string, "
                f"found {type(content).__name__}"
            )
        if not content.strip():
            raise RowProblem(f"message {i} ({message['role']}): content is empty")
        if i - 1 < start:
            continue
        expected = "user" if (i - 1 - start) % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise RowProblem(
                f"message {i} has role `{message['role']}` where `{expected}` was expected "
                "(roles must go [system], user, assistant, user, assistant, ...)"
            )
    if len(messages) <= start or messages[-1]["role"] != "assistant":
        raise RowProblem("the conversation must end with an assistant message")


def fill_variables(value: Any, variables: dict[str, str]) -> Any:
    """Replace `{key}` with its value in every string of a row (other braces are left alone)."""
    if not variables:
        return value
    if isinstance(value, str):
        for key, text in variables.items():
            value = value.replace("{" + key + "}", text)
        return value
    if isinstance(value, dict):
        return {k: fill_variables(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [fill_variables(v, variables) for v in value]
    return value
