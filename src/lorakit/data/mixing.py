"""Several datasets in one: `data.datasets`, a list of sources (files or built-in names), each
with its own format, columns and split, and how many of its rows the mix takes.

A source's rows are taken `weight` times (2: every row twice; 0.5: half of them) or exactly
`rows` times in all; the whole copies come first, then a part drawn without replacement with
the mix's seed. The mixed rows are then shuffled with that seed, so that `data.limit` and the
first samples `lorakit data inspect` shows are drawn from every source. The same config and
seed give the same rows in the same order.
"""

from __future__ import annotations

import random
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lorakit.data.formats import check_columns
from lorakit.errors import DataError


class DatasetSource(BaseModel):
    """One dataset of a mix (`data.datasets`); unset fields take the `data` section's value."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        description="A .jsonl/.json/.csv/.parquet file, or a built-in dataset name (identity, "
        "general, arithmetic)."
    )
    split: str | None = Field(None, description="Split of a built-in dataset (None: data.split).")
    format: (
        Literal["auto", "text", "prompt_completion", "alpaca", "sharegpt", "messages"] | None
    ) = Field(None, description="Row format of this source (None: data.format).")
    columns: dict[str, str] | None = Field(
        None, description="{lorakit field: column} for this source (None: data.columns)."
    )
    template_vars: dict[str, str] | None = Field(
        None, description="Values for {key} placeholders (None: data.template_vars)."
    )
    weight: float | None = Field(
        None, gt=0, description="Take its rows this many times (0.5: half, drawn with the seed)."
    )
    rows: int | None = Field(
        None, ge=1, description="Take exactly this many of its rows (repeated when it has fewer)."
    )

    @field_validator("columns")
    @classmethod
    def _known_fields(cls, columns: dict[str, str] | None) -> dict[str, str] | None:
        return None if columns is None else check_columns(columns, "data.datasets columns")

    @model_validator(mode="after")
    def _one_amount(self) -> DatasetSource:
        if self.weight is not None and self.rows is not None:
            raise ValueError(
                f"data.datasets entry `{self.path}` sets both weight and rows; set one of them"
            )
        return self

    def count(self, available: int) -> int:
        """How many rows this source gives the mix, of its `available` rows."""
        if self.rows is not None:
            return self.rows
        return round(available * (1.0 if self.weight is None else self.weight))


def take(items: list[Any], count: int, rng: random.Random) -> list[Any]:
    """`count` of `items`: whole copies of the list in order, then a part drawn without
    replacement (kept in file order)."""
    whole, part = divmod(count, len(items)) if items else (0, 0)
    chosen = sorted(rng.sample(range(len(items)), part))
    return items * whole + [items[i] for i in chosen]


def mix(parts: list[tuple[str, DatasetSource, list[Any]]], seed: int) -> list[Any]:
    """The mixed, shuffled rows of (name, source, rows) parts; DataError naming a source that
    gives the mix no row."""
    rng = random.Random(seed)
    mixed: list[Any] = []
    for name, source, rows in parts:
        count = source.count(len(rows))
        if not rows or count == 0:
            raise DataError(
                f"data.datasets entry `{name}` gives the mix no row ({len(rows)} rows, "
                f"weight {source.weight}); raise its weight or set rows"
            )
        mixed += take(rows, count, rng)
    rng.shuffle(mixed)
    return mixed


def describe_mix(parts: list[tuple[str, DatasetSource, list[Any]]]) -> str:
    """One line per source: its rows in the file and in the mix."""
    return "\n".join(
        f"  {name}: {source.count(len(rows))} rows of {len(rows)}" for name, source, rows in parts
    )
