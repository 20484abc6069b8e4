"""Where rows come from: one file, a folder of shard files, or a folder that Hugging Face
`datasets` wrote with `save_to_disk`.

A folder of shards is read file by file in name order (every .jsonl / .json / .csv / .parquet
file directly in it), each row named by its own file ("part-00002.jsonl line 7"). A
`save_to_disk` folder (it holds `state.json` or `dataset_dict.json`) is read with
`datasets.load_from_disk`, the split `data.split` of a dataset dict, rows named
"<folder> row N". The digest of a source (the token store's cache key) covers every file read.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from pathlib import Path

from lorakit.data.formats import FILE_TYPES, RawRow, count_rows, iter_rows
from lorakit.errors import DataError


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return path.is_dir() and any((path / n).is_file() for n in ("state.json", "dataset_dict.json"))


def shards(path: Path) -> list[Path]:
    """The dataset files directly in a folder, in name order; DataError when there are none."""
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FILE_TYPES)
    if not found:
        raise DataError(
            f"dataset folder {path} holds no {' / '.join(FILE_TYPES)} file and was not written "
            "by `datasets` save_to_disk; point data.dataset at a file or a folder of shards"
        )
    return found


def iter_source(path: Path, split: str = "train") -> Iterator[RawRow]:
    """The rows of a file, a folder of shards, or a save_to_disk folder, in order."""
    if is_saved_dataset(path):
        return _saved_rows(path, split)
    if path.is_dir():
        return itertools.chain.from_iterable(iter_rows(p) for p in shards(path))
    return iter_rows(path)


def count_source(path: Path) -> int | None:
    """About how many rows `iter_source` yields, where that is cheap to know (None if not)."""
    if is_saved_dataset(path):
        return None
    if path.is_dir():
        counts = [count_rows(p) for p in shards(path)]
        return None if None in counts else sum(c or 0 for c in counts)
    return count_rows(path)


def source_digest(path: Path) -> str:
    """sha256 over the names and bytes of every file a source reads."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with file.open("rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def _saved_rows(path: Path, split: str) -> Iterator[RawRow]:
    import datasets

    try:
        table = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises many kinds; the user needs the folder and reason
        raise DataError(f"cannot read {path} with datasets.load_from_disk: {err}") from err
    if isinstance(table, datasets.DatasetDict):
        if split not in table:
            raise DataError(
                f"{path} holds the splits {', '.join(table)}, not `{split}`; set data.split"
            )
        table = table[split]
    for i, row in enumerate(table, start=1):
        yield RawRow(i, f"{path.name} row {i}", row)
