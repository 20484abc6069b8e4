"""The package layout: every import inside lorakit goes down the layers of docs/architecture.md.

A module may import from its own package and from packages of a lower layer, never from a
higher layer or a sibling of its own layer. Imports inside functions and under TYPE_CHECKING
count too: a lazy import against the direction is still a circle in the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lorakit

PACKAGE = Path(lorakit.__file__).parent

# layer of each top-level part of lorakit (a subpackage or a single module)
LAYERS = {
    "errors": 0,
    "version": 0,
    "ops": 0,
    "files": 0,
    "quant": 1,
    "lora": 2,
    "models": 2,
    "data": 3,
    "train": 4,
    "serve": 4,
    "jobs": 5,
    "ui": 6,  # the web page reads the folders jobs write (runs, sweeps) and extends serve's app
    "cli": 7,
}
TOP = {"__init__", "__main__"}  # the public face and `python -m lorakit` may import anything


def part_of(module: str) -> str | None:
    """'lorakit.lora.model' -> 'lora'; 'lorakit' -> None (the package face)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def lorakit_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every lorakit module the file imports, anywhere in it."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("lorakit")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "lorakit":  # from lorakit import x: x is a part or a name
                for a in node.names:
                    name = f"lorakit.{a.name}"
                    found.append((node.lineno, name if a.name in LAYERS else "lorakit"))
            elif node.module.startswith("lorakit."):
                found.append((node.lineno, node.module))
    return found


def violations() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if len(relative.parts) == 1 and relative.stem in TOP:
            continue
        own = relative.parts[0].removesuffix(".py")
        assert own in LAYERS, f"{relative}: a new part of lorakit; give it a layer in LAYERS"
        for line, module in lorakit_imports(path):
            target = part_of(module)
            if target == own:
                continue
            if target is None:
                problems.append(f"{relative}:{line} imports the package face `lorakit`")
            elif target not in LAYERS:
                problems.append(f"{relative}:{line} imports unknown part `{module}`")
            elif LAYERS[target] >= LAYERS[own]:
                problems.append(
                    f"{relative}:{line} ({own}, layer {LAYERS[own]}) imports {module} "
                    f"({target}, layer {LAYERS[target]})"
                )
    return problems


def test_imports_go_down_the_layers():
    assert violations() == []


def test_the_check_sees_a_wrong_import(tmp_path, monkeypatch):
    # a lora module importing from train must be reported
    fake = tmp_path / "lorakit"
    (fake / "lora").mkdir(parents=True)
    (fake / "lora" / "bad.py").write_text("def f():\n    from lorakit.train.loop import train\n")
    (fake / "train").mkdir()
    (fake / "train" / "ok.py").write_text("from lorakit.lora.model import LoraModel\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert violations() == [
        "lora/bad.py:2 (lora, layer 2) imports lorakit.train.loop (train, layer 4)"
    ]


def test_every_part_has_a_public_face():
    for part in LAYERS:
        path = PACKAGE / part
        assert (path / "__init__.py").is_file() or (PACKAGE / f"{part}.py").is_file(), part
