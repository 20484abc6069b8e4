"""Error types: every user mistake raises one of these with what was given, what was expected
and how to fix it."""

from __future__ import annotations

import difflib


class LorakitError(Exception):
    """Base class of lorakit's user-facing errors."""


class ConfigError(LorakitError, ValueError):
    """A configuration key or value is wrong."""


class AdapterError(LorakitError, ValueError):
    """An adapter directory or file cannot be used (missing, corrupt, wrong base, pickle)."""


class DataError(LorakitError, ValueError):
    """A dataset file or row cannot be used."""


class ModelError(LorakitError, ValueError):
    """A base model cannot be found or loaded."""


class StorageError(LorakitError, OSError):
    """A file cannot be written: the disk is full, the file system read-only, access denied."""


def closest(name: str, choices: list[str] | tuple[str, ...] | set[str]) -> str:
    """' (did you mean `x`?)' for the closest choice, or '' when nothing is close."""
    match = difflib.get_close_matches(name, sorted(choices), n=1, cutoff=0.6)
    return f" (did you mean `{match[0]}`?)" if match else ""
