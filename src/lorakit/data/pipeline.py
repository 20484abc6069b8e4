"""Datasets to training batches: load, convert every format to messages, tokenize with masked
labels, report bad rows, and plan deterministic (packed or length-grouped) batches.

A sample's `labels` equal its `input_ids` on supervised tokens (the assistant responses by
default) and are -100 elsewhere; the first token of every sample is never a target, so a packed
row has exactly the targets of its samples run one by one. The modules behind this one:
`formats` (files and row formats), `tokenize` (spans and labels), `batches` (plans, packing,
collation), `builtin` (built-in datasets, exact match). The package's names are exported by
`lorakit.data`, not here.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lorakit.data.batches import Plan, collate, make_batches, padding_share
from lorakit.data.builtin import (
    BUILTIN_VARIABLES,
    builtin_dataset_path,
)
from lorakit.data.formats import (
    FILE_TYPES,
    RawRow,
    RowProblem,
    check_columns,
    check_format,
    detect_format,
    rename_columns,
)
from lorakit.data.mixing import DatasetSource, describe_mix, mix
from lorakit.data.parallel import (
    CHUNK_ROWS,
    EncodeJob,
    Progress,
    chunked,
    convert_row,
    default_num_proc,
    encode_row,
    tokenize_chunks,
)
from lorakit.data.sources import count_source, iter_source
from lorakit.data.store import (
    ConcatSamples,
    StoreSamples,
    StoreWriter,
    cache_key,
    cache_root,
    cached_store,
    key_parts,
    remembered_digest,
    tokenizer_digest,
)
from lorakit.data.tokenize import IGNORE_INDEX, supervised_count
from lorakit.errors import DataError
from lorakit.files import write_text
from lorakit.models import PLAIN_TEMPLATE, chat_template_of
from lorakit.version import __version__


class DataConfig(BaseModel):
    """Which dataset to train on and how to turn it into token batches."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(
        "identity",
        description="A .jsonl/.json/.csv/.parquet file, a folder of such shards, a folder "
        "written by `datasets` save_to_disk, or a built-in dataset name (identity, general, "
        "arithmetic; concise: preference pairs).",
    )
    split: str = Field(
        "train",
        description="Split of a built-in dataset (train or test) or of a save_to_disk folder.",
    )
    format: Literal[
        "auto", "text", "prompt_completion", "alpaca", "sharegpt", "messages", "preference"
    ] = Field(
        "auto",
        description="Row format (the columns of each: docs/data-formats.md); auto detects it "
        "from the columns of the first row. preference: prompt / chosen / rejected pairs "
        "(method dpo, orpo, simpo).",
    )
    columns: dict[str, str] = Field(
        default_factory=dict, description="Map lorakit field names to the file's column names."
    )
    template_vars: dict[str, str] | None = Field(
        None, description="Values for {key} placeholders (None: the built-in dataset's defaults)."
    )
    template: Literal["auto", "chat", "plain"] = Field(
        "auto", description="auto: the tokenizer's chat template if it has one, else plain."
    )
    system_prompt: str | None = Field(
        None, description="System message added to conversations that have none."
    )
    max_length: int = Field(1024, ge=8, description="Longest sample (and packed row) in tokens.")
    truncation: Literal["right", "left"] = Field(
        "right", description="Cut long samples at the end (right) or at the start (left)."
    )
    train_on: Literal["responses", "all"] = Field(
        "responses", description="Train on assistant responses only, or on every token."
    )
    packing: bool = Field(False, description="Pack several samples into each row.")
    group_by_length: bool = Field(
        False,
        description="Unpacked: batch samples of similar length to reduce padding (sorted "
        "batches learn less: off by default, as in transformers.Trainer).",
    )
    bad_rows: Literal["error", "skip"] = Field(
        "error", description="On an unusable row: stop with its report, or skip it."
    )
    max_skipped_share: float = Field(
        0.1, ge=0.0, le=1.0, description="With bad_rows=skip, the largest share of rows skipped."
    )
    limit: int | None = Field(None, ge=1, description="Use only the first N rows.")
    num_proc: int | None = Field(
        None, ge=1, description="Processes tokenizing the rows (None: one per core)."
    )
    cache: bool = Field(
        True,
        description="Keep the tokenized dataset on disk and reuse it while the file, tokenizer, "
        "template and token settings are the same (`lorakit data cache` lists and clears).",
    )
    datasets: list[DatasetSource] = Field(
        default_factory=list,
        description="Several datasets mixed into one, instead of `dataset`: a list of {path, "
        "split, format, columns, template_vars, weight or rows} (docs/data-formats.md).",
    )
    mix_seed: int = Field(0, description="Seed of the rows drawn for `datasets` and their order.")

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        # the default `dataset` beside `datasets` is what a resolved config (config.yaml) holds
        default = type(self).model_fields["dataset"].default
        if self.datasets and self.dataset != default:
            raise ValueError(
                f"data sets both `dataset` ({self.dataset!r}) and `datasets`; keep one of them "
                f"(add {self.dataset!r} to the `datasets` list to mix it in)"
            )
        return self

    @field_validator("columns")
    @classmethod
    def _known_fields(cls, columns: dict[str, str]) -> dict[str, str]:
        return check_columns(columns)


@dataclass
class Sample:
    """One tokenized sample and the row it came from."""

    input_ids: list[int]
    labels: list[int]
    where: str  # file and row, e.g. "train.jsonl line 7"


@dataclass
class TokenizedDataset:
    """Tokenized samples plus what the pipeline did (rows used, skipped, truncated)."""

    samples: list[Sample]  # or a token store's StoreSamples, or a ConcatSamples of several
    config: DataConfig
    source: str
    pad_token_id: int
    rows_total: int
    skipped: list[str] = field(default_factory=list)
    truncated: int = 0
    raw_text: bool = False  # rows of the `text` format: no prompt format, trained on whole

    def __len__(self) -> int:
        return len(self.samples)

    def lengths(self) -> list[int]:
        """Token count of every sample."""
        if isinstance(self.samples, StoreSamples | ConcatSamples):  # the index, nothing loaded
            return self.samples.lengths()
        return [len(s.input_ids) for s in self.samples]

    def supervised_tokens(self) -> int:
        """How many tokens are trained on, over the whole dataset."""
        if isinstance(self.samples, StoreSamples | ConcatSamples):
            return self.samples.supervised_tokens()
        return sum(supervised_count(s.labels) for s in self.samples)

    def describe(self, sample_ids: list[int] | list[list[int]]) -> str:
        """The file rows behind sample indices (e.g. a batch's `sample_ids`)."""
        flat = [i for ids in sample_ids for i in (ids if isinstance(ids, list) else [ids])]
        return ", ".join(self.samples[i].where for i in flat)

    def summary(self) -> str:
        """One line: rows used and skipped, tokens and supervised tokens."""
        tokens = sum(self.lengths())
        return (
            f"{self.source}: {len(self)} of {self.rows_total} rows used, {len(self.skipped)} "
            f"skipped, {self.truncated} truncated; {tokens} tokens, "
            f"{self.supervised_tokens()} supervised"
        )


def _source(config: DataConfig) -> tuple[Path, dict[str, str]]:
    """The file to read and the template variables to fill."""
    path = Path(config.dataset).expanduser()
    if path.suffix.lower() in FILE_TYPES or path.exists():
        return path, dict(config.template_vars or {})
    builtin = builtin_dataset_path(config.dataset, config.split)
    variables = BUILTIN_VARIABLES.get(config.dataset, {})
    return builtin, {**variables, **(config.template_vars or {})}


def check_dataset(config: DataConfig) -> None:
    """Read every row of the dataset (file, built-in or mix) without a tokenizer, as a run
    does before its model loads: raises DataError when it is missing, unreadable, of no
    detectable format, without one usable row, or with rows the bad-row policy refuses (the
    same report `build_dataset` gives). A file that passed with the same settings before (its
    contents' digest remembered in the cache) is not read again."""
    memo = _checked_memo(config)
    if memo is not None and memo.is_file():
        return
    source, conversations = load_conversations(config)
    if not conversations:
        raise DataError(
            f"{source}: the dataset has no rows; check data.format and data.columns against "
            "docs/data-formats.md"
        )
    problems = [f"{row.where}: {c}" for row, c in conversations if isinstance(c, RowProblem)]
    check_rows(config, source, len(conversations), problems, unreadable=len(problems))
    if memo is not None:
        with contextlib.suppress(OSError):  # a read-only cache: check again next time
            memo.parent.mkdir(parents=True, exist_ok=True)
            write_text(memo, "passed\n")


def _checked_memo(config: DataConfig) -> Path | None:
    """Where a passed check of this source and these row settings is remembered (None for a
    mix, a missing source or data.cache false)."""
    if config.datasets or not config.cache:
        return None
    path, _ = _source(config)
    if not path.exists():
        return None
    fields = ("split", "format", "columns", "limit", "bad_rows", "max_skipped_share")
    parts = {k: getattr(config, k) for k in fields}
    parts.update(version=__version__, digest=remembered_digest(path), name=path.name)
    key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    return cache_root() / "checked" / key[:32]


def mix_parts(config: DataConfig) -> list[tuple[str, DatasetSource, list[tuple[RawRow, Any]]]]:
    """(name, source, converted rows) of each dataset of `data.datasets`; an error names the
    entry."""
    parts = []
    for number, source in enumerate(config.datasets, start=1):
        update = {
            "dataset": source.path,
            "split": source.split or config.split,
            "format": source.format or config.format,
            "columns": config.columns if source.columns is None else source.columns,
            "template_vars": source.template_vars or config.template_vars,
            "datasets": [],
            "limit": None,
        }
        try:
            name, rows = load_conversations(config.model_copy(update=update))
        except DataError as error:
            raise DataError(f"data.datasets entry {number} ({source.path!r}): {error}") from None
        split = update["split"]
        parts.append((name if split == "train" else f"{name} ({split})", source, rows))
    return parts


def load_conversations(config: DataConfig) -> tuple[str, list[tuple[RawRow, Any]]]:
    """(source name, [(row, messages or text or RowProblem)]) for the configured dataset, or
    the mix of `data.datasets`."""
    if config.datasets:
        parts = mix_parts(config)
        rows = mix(parts, config.mix_seed)[: config.limit]
        return "mix of " + " + ".join(name for name, _, _ in parts), rows
    path, variables = _source(config)
    rows = list(itertools.islice(iter_source(path, config.split), config.limit))
    job = EncodeJob(config, None, "", _row_format(config, path, rows), variables)
    return path.name, [(row, convert_row(job, row.value)) for row in rows]


def _row_format(config: DataConfig, path: Path, rows: Iterable[RawRow]) -> str:
    """The configured row format, or the one the first object row's columns imply."""
    fmt = check_format(config.format)
    if fmt != "auto":
        return fmt
    seen: list[RawRow] = []
    for row in rows:
        seen.append(row)
        if isinstance(row.value, dict):
            return detect_format(rename_columns(row.value, config.columns).keys())
        if len(seen) > 1000:
            break
    example = next((f"; {r.where}: {r.value}" for r in seen), "; the file has no rows")
    raise DataError(
        f"{path}: no row is an object to detect the format from{example}. Check that "
        f"the file really is {path.suffix or 'a dataset file'} (docs/data-formats.md)"
    )


def prompt_template(config: DataConfig, tokenizer: Any) -> str:
    """The Jinja template conversations are rendered with (save it with the adapter)."""
    chat = chat_template_of(tokenizer)
    if config.template == "chat" and chat is None:
        raise DataError("data.template is `chat` but the tokenizer has no chat template")
    return PLAIN_TEMPLATE if config.template == "plain" or chat is None else chat


def build_dataset(
    config: DataConfig, tokenizer: Any, progress: Callable[[str], None] | None = None
) -> TokenizedDataset:
    """Tokenize the configured dataset into a token store on disk (reused from the cache when
    nothing that changes the tokens changed); bad rows stop the run or are skipped (up to a
    share). `progress` gets a line every few seconds while rows are tokenized. A mix of
    `data.datasets` is tokenized in memory, each row after its own source's conversion."""
    if config.datasets:
        return _build_mix(config, tokenizer)
    path, variables = _source(config)
    template = prompt_template(config, tokenizer)
    key = None
    tokenizer_id = tokenizer_digest(tokenizer) if config.cache and path.exists() else None
    if tokenizer_id is not None:
        key = cache_key(key_parts(config, tokenizer_id, template, path, variables))

    def write(writer: StoreWriter) -> dict[str, Any]:
        rows = iter_source(path, config.split)
        rows = itertools.islice(rows, config.limit) if config.limit else rows
        seen: list[RawRow] = []
        fmt = _row_format(config, path, _remember(rows, seen))
        job = EncodeJob(config, tokenizer, template, fmt, variables)
        total = count_source(path)
        total = min(total, config.limit) if total and config.limit else total or config.limit
        num_proc = config.num_proc or default_num_proc()
        if total is not None and total <= CHUNK_ROWS * 2:
            num_proc = 1  # starting workers would take longer than the rows
        shown = Progress(path.name, total, progress)
        for chunk in tokenize_chunks(job, chunked(itertools.chain(seen, rows)), num_proc):
            writer.add(chunk)
            shown.advance(chunk.rows)
        if progress is not None and shown.done > CHUNK_ROWS * 2:
            progress(shown.finish())
        return {"source": path.name}

    samples, _ = cached_store(key, write)
    meta = samples.meta
    dataset = TokenizedDataset(
        samples,
        config,
        path.name,
        tokenizer.pad_token_id,
        meta["rows_total"],
        list(meta["skipped"]),
        meta["truncated"],
        raw_text=meta["raw_text"],
    )
    _check_problems(dataset, unreadable=meta["unreadable"])
    return dataset


def _build_mix(config: DataConfig, tokenizer: Any) -> TokenizedDataset:
    source, conversations = load_conversations(config)
    job = EncodeJob(config, tokenizer, prompt_template(config, tokenizer), "", {})
    samples, problems, truncated = [], [], 0
    for row, conversation in conversations:
        try:
            ids, labels, cut = encode_row(job, conversation)
        except RowProblem as problem:
            problems.append(f"{row.where}: {problem}")
            continue
        truncated += cut
        samples.append(Sample(ids, labels, row.where))
    dataset = TokenizedDataset(
        samples,
        config,
        source,
        tokenizer.pad_token_id,
        len(conversations),
        problems,
        truncated,
        raw_text=any(isinstance(c, str) for _, c in conversations),
    )
    _check_problems(dataset, unreadable=sum(isinstance(c, RowProblem) for _, c in conversations))
    return dataset


def _remember(rows: Iterator[RawRow], seen: list[RawRow]) -> Iterator[RawRow]:
    """`rows`, each also appended to `seen` (the rows read to detect the format, put back)."""
    for row in rows:
        seen.append(row)
        yield row


def _check_problems(dataset: TokenizedDataset, unreadable: int = 0) -> None:
    """Apply the bad-row policy; a dataset with no supervised token is always an error."""
    check_rows(dataset.config, dataset.source, dataset.rows_total, dataset.skipped, unreadable)
    if dataset.supervised_tokens() == 0:
        raise DataError(
            f"{dataset.source}: no supervised token in {dataset.rows_total} rows; the loss would "
            "be undefined. Check the format and columns, or set data.train_on=all"
        )


def check_rows(
    config: DataConfig, source: str, rows_total: int, problems: list[str], unreadable: int = 0
) -> None:
    """The bad-row policy on the reports of unusable rows ("file line N: why"): an error listing
    them, or skipped up to data.max_skipped_share; a file none of whose rows could be read as
    the format (`unreadable` rows) is always an error."""
    listed = "\n  ".join(problems[:5]) + (
        f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
    )
    if unreadable and unreadable == rows_total:  # the whole file: no skip will help
        raise DataError(
            f"{source}: none of its {rows_total} rows can be used:\n  {listed}\n"
            "the file does not hold rows of the expected format; check data.format and "
            "data.columns against docs/data-formats.md"
        )
    if problems and config.bad_rows == "error":
        raise DataError(
            f"{source}: {len(problems)} of {rows_total} rows cannot be used:\n  "
            f"{listed}\nfix them, or set data.bad_rows=skip to skip them "
            f"(at most data.max_skipped_share={config.max_skipped_share} of the rows)"
        )
    share = len(problems) / max(rows_total, 1)
    if share > config.max_skipped_share:
        raise DataError(
            f"{source}: {len(problems)} of {rows_total} rows ({share:.0%}) are "
            f"unusable, more than data.max_skipped_share={config.max_skipped_share}:\n  {listed}"
        )


def plan_epoch(
    dataset: TokenizedDataset,
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
) -> Plan:
    """This rank's batches of one epoch as sample indices; (epoch, batch index) resumes exactly."""
    config = dataset.config
    return make_batches(
        dataset.lengths(),
        batch_size,
        seed=seed,
        epoch=epoch,
        packing=config.packing,
        max_length=config.max_length,
        group_by_length=config.group_by_length,
        shuffle=shuffle,
        rank=rank,
        world_size=world_size,
    )


def collate_batch(dataset: TokenizedDataset, rows: list[list[int]]) -> dict[str, Any]:
    """The tensors of one planned batch (packed rows when the dataset config packs); for
    preference pairs, the chosen rows then the rejected rows (`PreferenceDataset.collate`)."""
    from lorakit.data.preference import PreferenceDataset

    if isinstance(dataset, PreferenceDataset):
        return dataset.collate(rows)
    return collate(dataset.samples, rows, dataset.pad_token_id, dataset.config.packing)


def iter_batches(
    dataset: TokenizedDataset,
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    start: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(batch index, batch) of one epoch from batch `start` on: resuming at (epoch, start)."""
    plan = plan_epoch(dataset, batch_size, seed=seed, epoch=epoch, rank=rank, world_size=world_size)
    for index in range(start, len(plan)):
        yield index, collate_batch(dataset, plan[index])


def eval_examples(config: DataConfig) -> list[dict[str, Any]]:
    """Prompts and reference answers: every conversation minus its last (assistant) message."""
    source, conversations = load_conversations(config)
    examples = []
    for row, conversation in conversations:
        if isinstance(conversation, RowProblem):
            raise DataError(f"{row.where}: {conversation}")
        if isinstance(conversation, str):
            raise DataError(f"{source}: the text format has no prompts and references")
        examples.append(
            {
                "messages": conversation[:-1],
                "reference": conversation[-1]["content"],
                "where": row.where,
            }
        )
    return examples


def inspect_dataset(config: DataConfig, tokenizer: Any, n: int = 3, batch_size: int = 8) -> str:
    """N processed samples with supervised tokens between ⟦ ⟧, and the dataset statistics."""
    dataset = build_dataset(config, tokenizer)
    parts = []
    for sample in dataset.samples[:n]:
        text, start = "", 0
        for end in range(1, len(sample.input_ids) + 1):
            trained = sample.labels[start] != IGNORE_INDEX
            if end < len(sample.input_ids) and (sample.labels[end] != IGNORE_INDEX) == trained:
                continue
            span = tokenizer.decode(sample.input_ids[start:end])
            text += f"⟦{span}⟧" if trained else span
            start = end
        parts.append(f"--- {sample.where} ({len(sample.input_ids)} tokens)\n{text}")
    lengths = dataset.lengths()
    stats = [
        dataset.summary(),
        f"lengths: mean {sum(lengths) / len(lengths):.1f}, max {max(lengths)}, "
        f"max_length {config.max_length}",
    ]
    for packing in (False, True):
        cfg = config.model_copy(update={"packing": packing})
        plan = plan_epoch(replace(dataset, config=cfg), batch_size)
        stats.append(
            f"padding at batch size {batch_size}, {'packed' if packing else 'unpacked'}: "
            f"{padding_share(dataset.samples, plan):.1%} of {len(plan)} batches"
        )
    if config.datasets:
        stats.append("mixed from:\n" + describe_mix(mix_parts(config)))
    if dataset.skipped:
        stats.append("skipped rows:\n  " + "\n  ".join(dataset.skipped))
    return "\n".join(parts + stats)
