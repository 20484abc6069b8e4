"""lorakit's version (lorakit.version): one string, the package's and the installed metadata's."""

from __future__ import annotations

import re

import lorakit
from lorakit.version import __version__


def test_one_version_string():
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]|rc|\.dev|\.post)?\d*", __version__), __version__
    assert lorakit.__version__ == __version__
