"""The package layout: every import inside lorakit goes down the layers of docs/architecture.md.

A module may import from its own package and from packages of a lower layer, never from a
higher layer or a sibling of its own layer. Imports inside functions and under TYPE_CHECKING
count too: a lazy import against the direction is still a circle in the design.

Inside `lora`, the core modules (`CORE`) do not import `lora.compat`, the peft / Hugging Face
face: LoRA's layers and injection read without peft's names.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import lorakit

PACKAGE = Path(lorakit.__file__).parent

# layer of each top-level part of lorakit (a subpackage or a single module)
LAYERS = {
    "errors": 0,
    "version": 0,
    "ops": 0,
    "files": 0,
    "startup": 0,
    "adapter_specs": 1,
    "quant": 1,
    "lora": 2,
    "models": 2,
    "optimizers": 3,  # peft's import paths over lora
    "tuners": 3,
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


# lora modules that may not import lorakit.lora.compat
CORE = (
    "layers",
    "conv",
    "mha",
    "inject",
    "dora",
    "inits",
    "combine",
    "adapters",
    "rows",
    "fused",
    "shared",
    "update",
    "registry",
    "replication",
)
COMPAT = "lorakit.lora.compat"


def imported_names(path: Path) -> list[tuple[int, str]]:
    """(line, dotted name) for every import in the file, anywhere in it, with `from a import b`
    giving `a.b` and relative imports made absolute (for a module of `lorakit.lora`)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = ["lorakit", "lora"][: max(0, 3 - node.level)]
                base = ".".join(package + ([base] if base else []))
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return found


def core_imports_of_compat(package: Path) -> list[str]:
    problems = []
    for name in CORE:
        path = package / "lora" / f"{name}.py"
        if not path.is_file():
            continue
        for line, module in imported_names(path):
            if module == COMPAT or module.startswith(COMPAT + "."):
                problems.append(f"lora/{name}.py:{line} imports {module} (core imports no compat)")
    return problems


def test_core_does_not_import_compat():
    assert core_imports_of_compat(PACKAGE) == []


def test_the_check_sees_core_importing_compat(tmp_path):
    lora = tmp_path / "lorakit" / "lora"
    lora.mkdir(parents=True)
    (lora / "layers.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from lorakit.lora.compat.surface import PeftSurface\n"
    )
    (lora / "inject.py").write_text("def f():\n    from lorakit.lora import compat\n")
    (lora / "rows.py").write_text("from .compat import fields\nimport lorakit.lora.compat\n")
    (lora / "dora.py").write_text("from lorakit.lora import config\n")  # allowed
    (lora / "model.py").write_text("from lorakit.lora.compat.hf_face import HFFace\n")  # not core
    assert core_imports_of_compat(tmp_path / "lorakit") == [
        "lora/layers.py:3 imports lorakit.lora.compat.surface.PeftSurface (core imports no compat)",
        "lora/inject.py:2 imports lorakit.lora.compat (core imports no compat)",
        "lora/rows.py:1 imports lorakit.lora.compat.fields (core imports no compat)",
        "lora/rows.py:2 imports lorakit.lora.compat (core imports no compat)",
    ]


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


# ---------------------------------------------------------------- tests mirror the modules

TESTS = Path(__file__).parent
# the commands share test_cli.py's run folder, trained once for the whole file
_COMMAND = "a command's thin shell, run through main(argv) in tests/cli/test_cli.py"
# module -> where it is tested instead (one line); kept true by test_tests_mirror_the_modules
UNMIRRORED = {
    "cli/estimate.py": _COMMAND,
    "cli/export.py": _COMMAND,
    "cli/generate.py": _COMMAND,
    "cli/main.py": _COMMAND,
    "cli/sweep.py": _COMMAND,
    "cli/tools.py": _COMMAND,
}


def modules(package: Path = PACKAGE) -> list[str]:
    """Every module of lorakit but the packages' faces, as 'lora/layers.py'."""
    found = [p.relative_to(package) for p in package.rglob("*.py")]
    return sorted(str(p) for p in found if p.name not in ("__init__.py", "__main__.py"))


def test_files(module: str, tests: Path = TESTS) -> list[Path]:
    """The test files named after `module` ('lora/layers.py'): test_layers.py, or
    test_lora_layers.py where the plain name is another folder's, anywhere under its top
    package's test folder (tests/ for a top-level module)."""
    path = Path(module)
    names = {f"test_{path.stem}.py"}
    if len(path.parts) > 1:
        names.add(f"test_{path.parent.name}_{path.stem}.py")
        return sorted(p for p in (tests / path.parts[0]).rglob("test_*.py") if p.name in names)
    return sorted(p for p in tests.glob("test_*.py") if p.name in names)


test_files.__test__ = False  # a helper, not a test


def unmirrored(package: Path = PACKAGE, tests: Path = TESTS) -> list[str]:
    """Modules without a test file of their name and not on UNMIRRORED, and stale exemptions."""
    problems = []
    all_modules = modules(package)
    for module in all_modules:
        found = test_files(module, tests)
        if not found and module not in UNMIRRORED:
            problems.append(f"{module}: no test file of its name (or a line in UNMIRRORED)")
        if found and module in UNMIRRORED:
            problems.append(f"{module}: has {found[0].relative_to(tests)}; drop it from UNMIRRORED")
    for module in sorted(set(UNMIRRORED) - set(all_modules)):
        problems.append(f"{module}: no such module; drop it from UNMIRRORED")
    return problems


def test_tests_mirror_the_modules():
    assert unmirrored() == []


def test_the_mirror_check_sees_a_missing_test_and_a_stale_exemption(tmp_path, monkeypatch):
    package, tests = tmp_path / "lorakit", tmp_path / "tests"
    for name in ("lora/layers.py", "lora/config.py", "train/config.py", "ops.py", "cli/main.py"):
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text("")
    for name in ("lora/test_layers.py", "train/test_train_config.py", "test_ops.py", "cli/x.py"):
        (tests / name).parent.mkdir(parents=True, exist_ok=True)
        (tests / name).write_text("")
    (tests / "lora" / "peft").mkdir()
    (tests / "lora" / "peft" / "test_config.py").write_text("")  # in a subfolder: found
    monkeypatch.setattr(
        __import__(__name__),
        "UNMIRRORED",
        {"cli/main.py": "why", "ops.py": "why", "lora/gone.py": "why"},
    )
    assert unmirrored(package, tests) == [
        "ops.py: has test_ops.py; drop it from UNMIRRORED",
        "lora/gone.py: no such module; drop it from UNMIRRORED",
    ]
    (package / "train" / "plan.py").write_text("")
    missing = "train/plan.py: no test file of its name (or a line in UNMIRRORED)"
    assert missing in unmirrored(package, tests)


ROOT = Path(__file__).resolve().parents[1]
LINTED = ["src", "tests", "benchmarks", "scripts", "examples"]


def test_the_tree_is_ruff_clean():
    """`ruff format --check` and `ruff check` pass on the tree, as pyproject.toml sets them."""
    pytest.importorskip("ruff")
    for command in (["format", "--check"], ["check"]):
        done = subprocess.run(
            [sys.executable, "-m", "ruff", *command, *LINTED],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, f"ruff {' '.join(command)} failed:\n{done.stdout}{done.stderr}"


def duplicate_test_names(tests: Path = TESTS) -> list[str]:
    """Test file names used in more than one folder: pytest imports test modules by their
    base name (no __init__.py), so the second one fails to collect."""
    names = sorted(p.name for p in tests.rglob("test_*.py"))
    return sorted({n for n in names if names.count(n) > 1})


def test_test_file_names_are_unique():
    assert duplicate_test_names() == []


def test_the_name_check_sees_a_duplicate(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "test_same.py").write_text("")
    (tmp_path / "a" / "test_other.py").write_text("")
    assert duplicate_test_names(tmp_path) == ["test_same.py"]
