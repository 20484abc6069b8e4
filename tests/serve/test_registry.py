"""The served model's registry (lorakit.serve.registry): `--adapter` values, adapter names, and
requests holding their adapter while it is unloaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorakit.adapter_specs import parse_adapters
from lorakit.errors import AdapterError, ConfigError
from lorakit.serve.registry import ModelHost, check_adapter_name
from serve_support import BASE_NAME, make_adapters, make_model


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


def test_an_unloaded_adapter_stays_until_its_last_request_ends(tmp_path):
    paths = make_adapters(tmp_path, ["x", "y"])
    host = ModelHost(make_model(), BASE_NAME)
    host.load("x", paths["x"])
    first, second = host.acquire("x"), host.acquire("x")
    gone = host.unload("x")
    assert "x" not in host.adapters and host.leaving("x") and not gone.is_set()
    with pytest.raises(LookupError, match="adapter `x` is being unloaded"):
        host.acquire("x")  # no new request may take it
    with pytest.raises(AdapterError, match="`x` is being unloaded: 2 requests still use it"):
        host.load("x", paths["y"])  # nor may the name be loaded again yet
    with host.rows(["x"]):  # the requests holding it still compute with it
        pass
    first.release()
    first.release()  # a second release of one hold changes nothing
    assert not gone.is_set() and "x" in host.lora.peft_config
    second.release()
    assert gone.is_set() and not host.leaving("x") and "x" not in host.lora.peft_config
    host.load("x", paths["y"])  # the name is free again: a replacement
    assert host.adapters["x"].path == paths["y"]
    with pytest.raises(LookupError, match="no adapter named `z` is loaded"):
        host.acquire("z")
    assert host.unload("x").is_set()  # nothing holds it: gone at once
