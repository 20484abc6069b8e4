"""lorakit's errors (lorakit.errors): one base class the CLI turns into a one-line message, each
kind also the built-in exception callers already catch; `closest` for "did you mean"."""

from __future__ import annotations

import pytest

from lorakit.errors import (
    AdapterError,
    ConfigError,
    DataError,
    LorakitError,
    ModelError,
    StorageError,
    closest,
)


@pytest.mark.parametrize(
    "error, builtin",
    [
        (ConfigError, ValueError),
        (AdapterError, ValueError),
        (DataError, ValueError),
        (ModelError, ValueError),
        (StorageError, OSError),
    ],
)
def test_each_error_is_a_lorakit_error_and_a_builtin_one(error, builtin):
    assert issubclass(error, LorakitError) and issubclass(error, builtin)


def test_closest_names_the_nearest_choice_or_nothing():
    choices = ["lora_alpha", "lora_dropout", "target_modules"]
    assert closest("lora_alpa", choices) == " (did you mean `lora_alpha`?)"
    assert closest("target_module", set(choices)) == " (did you mean `target_modules`?)"
    assert closest("xyz", choices) == ""
    assert closest("anything", []) == ""
