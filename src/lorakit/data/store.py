"""The token store on disk and the cache of stores between runs.

A store is one folder of flat arrays, memory-mapped when read, so that a dataset of a million
conversations costs its index in memory, not its tokens:

    ids.bin       int32   every sample's token ids, back to back
    trained.bin   uint8   1 where the label is the token (trained on), 0 where it is -100
    offsets.bin   int64   n + 1 positions: sample i is ids[offsets[i]:offsets[i + 1]]
    where.bin     utf-8   the file row of every sample ("train.jsonl line 7"), back to back
    where_at.bin  int64   n + 1 positions into where.bin
    meta.json     what the pipeline did (rows read, skipped, truncated), the key's parts, and a
                  sha256 over the samples taken while writing (a run's data fingerprint)
    complete      written last: a folder without it is never read

A store in the cache lives at `<cache>/<key>`, the key a sha256 over everything that changes the
tokens: the file's bytes and name, the row format and column mapping, the template variables,
the rendered chat template, the tokenizer (its serialized vocabulary, merges, normalizer and
special tokens), the token settings of DataConfig, and the versions of lorakit, transformers and
tokenizers. The folder is written under a temporary name and renamed into place whole
(`lorakit.files.atomic_dir`), so a killed writer leaves no folder a later run could read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.data.sources import source_digest
from lorakit.data.tokenize import IGNORE_INDEX
from lorakit.files import atomic_dir, is_temporary, temporary_name
from lorakit.version import __version__

STORE_VERSION = 1
MARKER = "complete"
# DataConfig fields that change how samples are batched or which rows are refused, not tokens
NOT_IN_KEY = frozenset(
    {"packing", "group_by_length", "bad_rows", "max_skipped_share", "num_proc", "cache"}
)
_ARRAYS = {
    "ids": np.int32,
    "trained": np.uint8,
    "offsets": np.int64,
    "where": np.uint8,
    "where_at": np.int64,
}


def cache_root() -> Path:
    """Where cached stores live: $LORAKIT_DATA_CACHE, else <lorakit home>/data."""
    if os.environ.get("LORAKIT_DATA_CACHE"):
        return Path(os.environ["LORAKIT_DATA_CACHE"]).expanduser()
    from lorakit.models.builtin import lorakit_home

    return lorakit_home() / "data"


def tokenizer_digest(tokenizer: Any) -> str | None:
    """sha256 of what decides a tokenizer's ids; None for a tokenizer without a serialized
    form (a Python tokenizer), whose stores are then not cached."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    digest = hashlib.sha256(f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}".encode())
    digest.update(backend.to_str().encode())
    special = sorted((k, str(v)) for k, v in getattr(tokenizer, "special_tokens_map", {}).items())
    flags = [getattr(tokenizer, n, None) for n in ("add_bos_token", "add_eos_token")]
    digest.update(json.dumps([special, tokenizer.eos_token_id, flags], default=str).encode())
    return digest.hexdigest()


def key_parts(
    config: Any, tokenizer_id: str, template: str, path: Path, variables: dict[str, str]
) -> dict[str, Any]:
    """Everything the tokens depend on, as one JSON-able dict (its sha256 is the key)."""
    import tokenizers
    import transformers

    fields = config.model_dump(mode="json")
    settings = {k: v for k, v in fields.items() if k not in NOT_IN_KEY | {"dataset", "split"}}
    settings["template_vars"] = dict(sorted(variables.items()))
    return {
        "store_version": STORE_VERSION,
        "versions": [__version__, transformers.__version__, tokenizers.__version__],
        "file": {"name": path.name, "sha256": remembered_digest(path)},
        "settings": settings,
        "tokenizer": tokenizer_id,
        "template": hashlib.sha256(template.encode()).hexdigest(),
    }


def remembered_digest(path: Path) -> str:
    """`source_digest(path)`, remembered under the files' paths, sizes, inodes and change
    times and ends (`<cache>/digests/`), so a file of gigabytes is read once, not at every run
    start; a write to a file changes its change time (or its ends) and so reads it again."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stats = [(str(f.resolve()), *_stat(f)) for f in files]
    name = hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:32]
    memo = cache_root() / "digests" / name
    with contextlib.suppress(OSError):
        return memo.read_text().strip()
    digest = source_digest(path)
    with contextlib.suppress(OSError):  # a read-only cache: digest again next time
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(temporary_name(name))
        tmp.write_text(digest + "\n")
        os.replace(tmp, memo)
    return digest


def _stat(path: Path) -> tuple[int, int, int, int, str]:
    """What tells a file's versions apart without reading it whole: size, inode, times, and
    a hash of its first and last 64 KiB (a rewrite within one clock tick changes them)."""
    st = path.stat()
    with path.open("rb") as f:
        ends = f.read(1 << 16)
        f.seek(max(st.st_size - (1 << 16), 0))
        ends += f.read(1 << 16)
    return st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, hashlib.sha256(ends).hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    """The folder name of a store in the cache."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass
class Chunk:
    """Tokenized rows, in file order: the good samples as flat arrays, and the bad rows."""

    ids: np.ndarray  # int32, every kept sample's ids back to back
    trained: np.ndarray  # uint8
    lengths: np.ndarray  # int64, one per kept sample
    where: list[str]  # one per kept sample
    problems: list[str]  # "file line N: why", one per skipped row
    rows: int = 0  # rows read
    truncated: int = 0
    unreadable: int = 0  # rows the format could not read at all
    raw_text: bool = False


class StoreWriter:
    """Appends chunks to the arrays of a store being written in `folder`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files = {name: open(folder / f"{name}.bin", "wb") for name in _ARRAYS}  # noqa: SIM115
        self.tokens = self.samples = self.where_bytes = 0
        self.files["offsets"].write(np.zeros(1, np.int64).tobytes())
        self.files["where_at"].write(np.zeros(1, np.int64).tobytes())
        self.meta: dict[str, Any] = {"rows_total": 0, "skipped": [], "truncated": 0}
        self.meta.update(unreadable=0, raw_text=False, supervised=0)
        self.content = hashlib.sha256()  # the samples' tokens, labels and boundaries

    def add(self, chunk: Chunk) -> None:
        """Append one chunk's samples and bad rows."""
        ids = chunk.ids.astype(np.int32, copy=False).tobytes()
        trained = chunk.trained.astype(np.uint8, copy=False).tobytes()
        lengths = chunk.lengths.astype(np.int64, copy=False).tobytes()
        self.files["ids"].write(ids)
        self.files["trained"].write(trained)
        for part in (lengths, ids, trained):
            self.content.update(part)
        ends = self.tokens + np.cumsum(chunk.lengths, dtype=np.int64)
        self.files["offsets"].write(ends.tobytes())
        self.tokens += int(chunk.lengths.sum())
        encoded = [w.encode() for w in chunk.where]
        self.files["where"].write(b"".join(encoded))
        at = self.where_bytes + np.cumsum([len(w) for w in encoded], dtype=np.int64)
        self.files["where_at"].write(at.tobytes())
        self.where_bytes += sum(len(w) for w in encoded)
        self.samples += len(chunk.where)
        meta = self.meta
        meta["rows_total"] += chunk.rows
        meta["skipped"] += chunk.problems
        meta["truncated"] += chunk.truncated
        meta["unreadable"] += chunk.unreadable
        meta["raw_text"] = meta["raw_text"] or chunk.raw_text
        meta["supervised"] += int(chunk.trained.sum())

    def close(self, extra: dict[str, Any]) -> None:
        """Flush the arrays and write meta.json (the caller's atomic_dir adds the marker)."""
        for f in self.files.values():
            f.close()
        meta = {**self.meta, **extra, "samples": self.samples, "tokens": self.tokens}
        meta.update(content=self.content.hexdigest(), created=time.time())
        (self.folder / "meta.json").write_text(json.dumps(meta) + "\n")


def _map(folder: Path, name: str) -> np.ndarray:
    """One array of a store, memory-mapped (an empty file is an empty array)."""
    path = folder / f"{name}.bin"
    if path.stat().st_size == 0:
        return np.empty(0, _ARRAYS[name])
    return np.memmap(path, dtype=_ARRAYS[name], mode="r")


def _position(index: int, length: int) -> int:
    """`index` of a sequence of `length` items as a position from 0 (negative from the end)."""
    position = index + length if index < 0 else index
    if not 0 <= position < length:
        raise IndexError(f"sample {index} of {length}")
    return position


class StoreSamples(Sequence):
    """The samples of a store, read on demand: `samples[i]` is a `Sample` with lists, as the
    in-memory pipeline gives; `lengths()` and `supervised_tokens()` read only the index."""

    def __init__(self, folder: Path, keep_alive: Any = None):
        self.folder = folder
        self.arrays = {name: _map(folder, name) for name in _ARRAYS}
        self.meta = json.loads((folder / "meta.json").read_text())
        self._keep_alive = keep_alive  # a temporary folder removed with this object

    def __len__(self) -> int:
        return len(self.arrays["offsets"]) - 1

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = _position(index, len(self))
        return self.sample(index)

    def arrays_of(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids as int64, labels as int64) of one sample."""
        a, b = self.arrays["offsets"][index : index + 2]
        ids = np.asarray(self.arrays["ids"][a:b], dtype=np.int64)
        labels = np.where(self.arrays["trained"][a:b] != 0, ids, IGNORE_INDEX)
        return ids, labels

    def iter_arrays(self, block: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(input_ids, labels) of every sample in order, as int64 arrays. The files are read in
        blocks of samples rather than through the maps, so a pass over the whole store leaves
        no mapped page in this process's memory."""
        offsets = np.asarray(self.arrays["offsets"])
        with (
            open(self.folder / "ids.bin", "rb") as ids_file,
            open(self.folder / "trained.bin", "rb") as trained_file,
        ):
            for first in range(0, len(self), block):
                last = min(first + block, len(self))
                a, b = int(offsets[first]), int(offsets[last])
                ids = np.fromfile(ids_file, np.int32, b - a, offset=0).astype(np.int64)
                trained = np.fromfile(trained_file, np.uint8, b - a, offset=0)
                labels = np.where(trained != 0, ids, IGNORE_INDEX)
                for i in range(first, last):
                    lo, hi = offsets[i] - a, offsets[i + 1] - a
                    yield ids[lo:hi], labels[lo:hi]

    def content_digest(self) -> str | None:
        """sha256 over the samples' lengths, ids and trained flags, taken while the store was
        written (None for a store written before lorakit kept it)."""
        return self.meta.get("content")

    def sample(self, index: int) -> Any:
        """One sample as the pipeline's `Sample`."""
        from lorakit.data.pipeline import Sample

        ids, labels = self.arrays_of(index)
        a, b = self.arrays["where_at"][index : index + 2]
        where = bytes(self.arrays["where"][a:b]).decode()
        return Sample(ids.tolist(), labels.tolist(), where)

    def __iter__(self) -> Iterator[Any]:
        for i in range(len(self)):
            yield self.sample(i)

    def __add__(self, other: Any) -> ConcatSamples:
        return ConcatSamples([self, other])

    def __radd__(self, other: Any) -> ConcatSamples:
        return ConcatSamples([other, self])

    def lengths(self) -> list[int]:
        """Token count of every sample, from the index only."""
        return np.diff(self.arrays["offsets"]).tolist()

    def supervised_tokens(self) -> int:
        """Tokens trained on, over the whole store."""
        return int(self.meta["supervised"])


class ConcatSamples(Sequence):
    """Several sample sequences (stores or lists) read as one, in order, none copied: a mix of
    datasets of any size costs an offset per part."""

    def __init__(self, parts: list[Sequence[Any]]):
        self.parts = [q for p in parts for q in (p.parts if isinstance(p, ConcatSamples) else [p])]
        self.starts = np.cumsum([0, *(len(p) for p in self.parts)]).tolist()

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = _position(index, len(self))
        part = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.parts[part][index - self.starts[part]]

    def __add__(self, other: Any) -> ConcatSamples:
        return ConcatSamples([self, other])

    def __radd__(self, other: Any) -> ConcatSamples:
        return ConcatSamples([other, self])

    def lengths(self) -> list[int]:
        """Token count of every sample (from the index of each store part)."""
        return [n for p in self.parts for n in _lengths(p)]

    def supervised_tokens(self) -> int:
        """Tokens trained on, over every part."""
        return sum(_supervised(p) for p in self.parts)

    def content_digest(self) -> str | None:
        """One digest over the parts' own, where every part is a store that kept one."""
        digests = [getattr(p, "content_digest", lambda: None)() for p in self.parts]
        if None in digests:
            return None
        return hashlib.sha256("/".join(digests).encode()).hexdigest()

    def iter_arrays(self) -> Iterator[tuple[Any, Any]]:
        """(input_ids, labels) of every sample in order."""
        for p in self.parts:
            if hasattr(p, "iter_arrays"):
                yield from p.iter_arrays()
            else:
                yield from ((s.input_ids, s.labels) for s in p)


def _lengths(samples: Sequence[Any]) -> list[int]:
    if hasattr(samples, "lengths"):
        return samples.lengths()
    return [len(s.input_ids) for s in samples]


def _supervised(samples: Sequence[Any]) -> int:
    if hasattr(samples, "supervised_tokens"):
        return samples.supervised_tokens()
    return sum(sum(1 for label in s.labels if label != IGNORE_INDEX) for s in samples)


def cached_store(key: str | None, write: Any) -> tuple[StoreSamples, bool]:
    """(samples, hit): the cached store of `key`, or one written by `write(writer)` (and
    cached under `key`; into a temporary folder when `key` is None)."""
    if key is not None:
        folder = cache_root() / key
        if (folder / MARKER).is_file():
            with contextlib.suppress(OSError):  # a read-only cache is still read
                os.utime(folder / MARKER)  # last use, shown by `lorakit data cache`
            return StoreSamples(folder), True
        with atomic_dir(folder, marker=MARKER) as staging:
            _write(staging, write, key)
        return StoreSamples(folder), False
    scratch = tempfile.TemporaryDirectory(prefix="lorakit-store-")
    folder = Path(scratch.name)
    _write(folder, write, None)
    return StoreSamples(folder, keep_alive=scratch), False


def _write(folder: Path, write: Any, key: str | None) -> None:
    """Fill `folder` with a store (the arrays and meta.json)."""
    writer = StoreWriter(folder)
    try:
        extra = write(writer) or {}
    finally:
        for f in writer.files.values():
            f.close()
    writer.close({**extra, "key": key})


@dataclass
class CacheEntry:
    """One cached store as `lorakit data cache` lists it."""

    key: str
    source: str
    samples: int
    tokens: int
    bytes: int
    created: float
    used: float
    complete: bool


def list_caches(root: Path | None = None) -> list[CacheEntry]:
    """The stores in the cache (incomplete ones too, marked so), most recently used first."""
    root = root or cache_root()
    entries = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if not folder.is_dir() or folder.name == "digests":
            continue
        size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError):
            meta = {}
        marker = folder / MARKER
        complete = marker.is_file() and not is_temporary(folder.name)
        used = marker.stat().st_mtime if complete else folder.stat().st_mtime
        entries.append(
            CacheEntry(
                folder.name,
                str(meta.get("source", "?")),
                int(meta.get("samples", 0)),
                int(meta.get("tokens", 0)),
                size,
                float(meta.get("created", folder.stat().st_mtime)),
                used,
                complete,
            )
        )
    return sorted(entries, key=lambda e: -e.used)


def clear_caches(keys: list[str] | None = None, root: Path | None = None) -> list[str]:
    """Remove the named stores (every store when `keys` is None); returns the removed keys."""
    root = root or cache_root()
    known = {e.key for e in list_caches(root)}
    if keys is not None:
        unknown = [k for k in keys if k not in known]
        if unknown:
            from lorakit.errors import DataError

            raise DataError(
                f"no cached store {', '.join(unknown)} in {root}; `lorakit data cache` lists them"
            )
    removed = sorted(known if keys is None else set(keys))
    for key in removed:
        shutil.rmtree(root / key, ignore_errors=True)
    if keys is None:
        shutil.rmtree(root / "digests", ignore_errors=True)
    return removed


def cache_table(keys: list[str] | None = None) -> str:
    """The cache as `lorakit data cache` prints it: one line per store, then the total."""
    entries = [e for e in list_caches() if keys is None or e.key in keys]
    if not entries:
        return f"no cached stores in {cache_root()}"
    lines = [f"{'key':32}  {'source':24} {'samples':>9} {'tokens':>12} {'size':>9}  last used"]
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.used))
        state = "" if e.complete else "  (incomplete: never read)"
        lines.append(
            f"{e.key:32}  {e.source[:24]:24} {e.samples:>9,} {e.tokens:>12,} "
            f"{e.bytes / 2**20:>7.1f}MB  {used}{state}"
        )
    total = sum(e.bytes for e in entries) / 2**20
    lines.append(f"{len(entries)} store(s), {total:.1f} MB in {cache_root()}")
    return "\n".join(lines)
