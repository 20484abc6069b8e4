"""The served model's registry (lorakit.serve.registry): `--adapter` values, adapter names."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorakit.adapter_specs import parse_adapters
from lorakit.errors import ConfigError
from lorakit.serve.registry import check_adapter_name


def test_adapter_values_are_name_path_or_a_bare_folder():
    specs = ["sql=./out", "./runs/quick/final/", "runs/ranks/r=4/best", "chat=a=b", "."]
    assert parse_adapters(specs) == {
        "sql": Path("out"),
        "final": Path("runs/quick/final"),  # a bare path is named after its folder
        "best": Path("runs/ranks/r=4/best"),  # an '=' after a '/' is part of the path
        "chat": Path("a=b"),
        "adapter": Path("."),  # a path without a folder name
    }
    assert list(parse_adapters(["b=x", "a=y"])) == ["b", "a"]  # in the order given


@pytest.mark.parametrize(
    "specs, message",
    [
        (["./a/out", "./b/out"], "two adapters are named `out`; use NAME=PATH to rename one"),
        (["x=./a", "x=./b"], "two adapters are named `x`"),
        (["=./out"], "expected PATH or NAME=PATH"),
        (["sql="], "expected PATH or NAME=PATH"),
    ],
)
def test_bad_adapter_values_are_refused(specs, message):
    with pytest.raises(ConfigError, match=message):
        parse_adapters(specs)


def test_adapter_names():
    check_adapter_name("sql-v2.1_a", "base")
    for bad in ("", "-x", "a/b", "x" * 65):
        with pytest.raises(ConfigError, match="is not allowed"):
            check_adapter_name(bad, "base")
    with pytest.raises(ConfigError, match="the base model's name"):
        check_adapter_name("base", "base")
