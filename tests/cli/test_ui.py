"""`lorakit ui` (lorakit.cli.ui): what it refuses before it serves anything. The page and its
routes: tests/ui/."""

from __future__ import annotations

import pytest

from lorakit.cli import main


@pytest.mark.parametrize(
    "argv, message",
    [
        (["ui"], "needs --runs DIR, --model BASE or both"),
        (["ui", "--runs", "no-such-folder"], "not a directory"),
        (["ui", "--runs", ".", "--host", "0.0.0.0"], "without an API key"),
        (["ui", "--runs", ".", "--adapter", "a=x"], "need a base model: pass --model"),
    ],
)
def test_ui_refuses_before_serving(capsys, argv, message):
    assert main(argv) == 1
    assert message in capsys.readouterr().err
