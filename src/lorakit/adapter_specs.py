"""`--adapter` values, the one rule every command reads them by: NAME=PATH, or a bare PATH
named after its folder. Light on purpose: the command line checks the folders exist before it
imports torch and transformers, so a wrong path fails at once."""

from __future__ import annotations

from pathlib import Path

from lorakit.errors import ConfigError


def parse_adapters(specs: list[str]) -> dict[str, Path]:
    """`--adapter` values -> {name: folder}, in order: NAME=PATH, or a bare PATH named after its
    folder (`./out` -> `out`). Text before the first '=' that holds a '/' is part of a bare path
    (`runs/ranks/r=4/final`). Empty names or paths and a name given twice are refused."""
    adapters: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or "/" in name:
            name, path = Path(spec).name or "adapter", spec
        if not name or not path:
            raise ConfigError(
                f"--adapter {spec!r}: expected PATH or NAME=PATH, e.g. --adapter ./out or "
                "--adapter sql=./out"
            )
        if name in adapters:
            raise ConfigError(
                f"--adapter: two adapters are named `{name}`; use NAME=PATH to rename one"
            )
        adapters[name] = Path(path)
    return adapters


def check_adapter_folders(argv: list[str]) -> None:
    """ConfigError naming the first `--adapter` folder in a command line that does not exist."""
    specs = []
    for i, arg in enumerate(argv):
        if arg == "--adapter" and i + 1 < len(argv):
            specs.append(argv[i + 1])
        elif arg.startswith("--adapter="):
            specs.append(arg.partition("=")[2])
    for name, folder in parse_adapters(specs).items():
        if not folder.expanduser().is_dir():
            raise ConfigError(
                f"--adapter {name}: adapter folder {folder.expanduser().absolute()} does not "
                "exist (expected a folder holding adapter_config.json, e.g. a run's final/)"
            )
