"""Experiments: one base run config and its variants, trained one after another under one folder.

A sweep file (YAML) holds

    base: configs/smollm2-lora.yaml  # a run config file (relative to the sweep file) or a mapping
    output_dir: runs/sweeps/ranks
    zip:  {lora.r: [4, 8], lora.lora_alpha: [8, 16]}   # lists paired element by element: 1 axis
    grid: {lora.use_rslora: [false, true]}             # each key its own axis
    variants: {q_only: {lora.target_modules: [q_proj]}, full: {method: full}}   # 1 axis
    prompts: ["What is 12 + 7?"]          # greedy answers recorded for every variant

The variants are the product of the axes, in this order (here 2 x 2 = 4, or with `variants`
2 x 2 x 2), named by their labels joined with '+' (`r=4+use_rslora=false`); each
is the base config with its overrides applied, trained as `lorakit train` would, in
`<output_dir>/<variant>/`. Every variant's config is validated before the first one starts.
A finished variant has `variant.json`; `--resume` skips those, continues an interrupted one
from its newest checkpoint and retries failed ones. A variant that fails (a bad value found
late, out of memory, a non-finite loss) is recorded with its error, and the sweep goes on.
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lorakit.errors import ConfigError
from lorakit.files import write_json
from lorakit.jobs.run_config import (
    RunConfig,
    apply_overrides,
    read_yaml,
    resolve_paths,
    validate_run_config,
)
from lorakit.jobs.sweep_measure import evaluate_baseline, measure_variant

PLAN = "sweep.json"  # the resolved plan, written before the first variant runs
DONE = "variant.json"  # a finished variant's record
FAILED = "error.json"  # a failed variant's record


class SweepConfig(BaseModel):
    """A sweep file: the base run config and how its variants differ."""

    model_config = ConfigDict(extra="forbid")

    base: str | dict[str, Any] = Field(
        description="Run config file (relative to the sweep file) or the run config itself."
    )
    output_dir: str = Field("runs/sweep", description="Sweep folder: one subfolder per variant.")
    grid: dict[str, list[Any]] = Field(
        default_factory=dict, description="key.path -> values; each key is one axis."
    )
    zip: dict[str, list[Any]] = Field(
        default_factory=dict, description="key.path -> values, paired element by element."
    )
    variants: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Named variants: name -> {key.path: value}."
    )
    prompts: list[str] = Field(
        default_factory=list, description="Prompts answered greedily by every variant."
    )
    max_new_tokens: int = Field(24, ge=1, description="Tokens per answer to `prompts`.")
    baseline: bool = Field(
        True, description="Also evaluate the base model once, untrained, as the reference row."
    )


@dataclass
class Variant:
    """One run of the sweep: its name, the overrides that make it, the resolved config."""

    name: str
    overrides: dict[str, Any]
    run: RunConfig

    @property
    def folder(self) -> Path:
        return Path(self.run.output_dir)


@dataclass
class Sweep:
    """A validated sweep: where it writes and every variant in order."""

    source: str
    output_dir: Path
    variants: list[Variant]
    prompts: list[str]
    max_new_tokens: int
    axes: list[str] = field(default_factory=list)  # key paths that vary, in axis order
    baseline: bool = True


# ---------------------------------------------------------------- planning


def _label(key: str, value: Any) -> str:
    """'lora.r', 8 -> 'r=8' (folder-safe)."""
    if isinstance(value, list):
        text = "-".join(str(v) for v in value)
    else:
        text = value if isinstance(value, str) else json.dumps(value)
    text = text.replace("/", "_").replace(",", "-").replace(" ", "").replace('"', "")
    return f"{key.rsplit('.', 1)[-1]}={text}"


def _axes(config: SweepConfig, where: str) -> list[list[tuple[str, dict[str, Any]]]]:
    """Each axis as a list of (label, overrides)."""
    axes = []
    if config.zip:
        lengths = {key: len(values) for key, values in config.zip.items()}
        if len(set(lengths.values())) != 1 or not next(iter(lengths.values())):
            raise ConfigError(
                f"{where}: the lists under zip must have one equal, non-zero length; got {lengths}"
            )
        keys = list(config.zip)
        rows = zip(*config.zip.values(), strict=True)
        axes.append([(_label(keys[0], row[0]), dict(zip(keys, row, strict=True))) for row in rows])
    for key, values in config.grid.items():
        if not values:
            raise ConfigError(f"{where}: grid.{key} is an empty list; give at least one value")
        axes.append([(_label(key, v), {key: v}) for v in values])
    if config.variants:
        for name in config.variants:
            if not name or "/" in name or name.startswith("."):
                raise ConfigError(f"{where}: variant name {name!r} cannot be a folder name")
        axes.append([(name, dict(over)) for name, over in config.variants.items()])
    if not axes:
        raise ConfigError(f"{where}: no variants; give `grid`, `zip` or `variants`")
    return axes


def _override_list(overrides: dict[str, Any]) -> list[str]:
    """{key: value} -> ['key=<value as YAML>'] for apply_overrides."""
    return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]


def plan_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read and validate a sweep file; every variant's run config is checked before any runs.

    `overrides` (key.path=value) apply to the base config of every variant, before the
    variant's own overrides (e.g. `train.max_steps=2` for a quick look)."""
    path = Path(path)
    raw = read_yaml(path)
    try:
        config = SweepConfig.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(
            f"`{'.'.join(str(p) for p in e['loc'])}`: {e['msg']}" for e in error.errors()
        )
        raise ConfigError(f"{path}: {problems}") from None
    if isinstance(config.base, str):
        base_path = (path.parent / config.base).resolve()
        base = read_yaml(base_path)
        resolve_paths(base, base_path.parent)
    else:
        base = json.loads(json.dumps(config.base))
        resolve_paths(base, path.parent)
    apply_overrides(base, list(overrides or []))
    output_dir = Path(config.output_dir)
    variants, seen = [], set()
    for combo in itertools.product(*_axes(config, str(path))):
        name = "+".join(label for label, _ in combo)
        if name in seen:
            raise ConfigError(f"{path}: two variants are both named `{name}`")
        seen.add(name)
        merged: dict[str, Any] = {}
        for _, over in combo:
            merged.update(over)
        data = json.loads(json.dumps(base))
        apply_overrides(data, _override_list(merged))
        data["output_dir"] = str(output_dir / name)
        try:
            run = validate_run_config(data, f"{path}: variant `{name}`")
        except ConfigError as error:
            raise ConfigError(str(error)) from None
        variants.append(Variant(name, merged, run))
    axes = list(config.zip)[:1] + list(config.grid) + (["variant"] if config.variants else [])
    return Sweep(
        str(path),
        output_dir,
        variants,
        config.prompts,
        config.max_new_tokens,
        axes,
        config.baseline,
    )


def _plan_record(sweep: Sweep) -> dict[str, Any]:
    return {
        "source": sweep.source,
        "axes": sweep.axes,
        "variants": [{"name": v.name, "overrides": v.overrides} for v in sweep.variants],
    }


def _prepare_folder(sweep: Sweep, resume: bool) -> None:
    """Create the sweep folder, or check that a resumed one holds this same plan."""
    plan_path = sweep.output_dir / PLAN
    record = _plan_record(sweep)
    if plan_path.is_file():
        if not resume:
            raise ConfigError(
                f"sweep folder {sweep.output_dir} holds a sweep already; pass --resume to "
                "continue it, or set output_dir to a new folder"
            )
        old = json.loads(plan_path.read_text(encoding="utf-8"))
        old_variants = {v["name"]: v["overrides"] for v in old.get("variants", [])}
        changed = [
            v.name
            for v in sweep.variants
            if v.name in old_variants and old_variants[v.name] != v.overrides
        ]
        if changed:
            raise ConfigError(
                f"sweep folder {sweep.output_dir}: variants {changed} have other overrides than "
                "when the sweep started; use a new output_dir"
            )
    elif sweep.output_dir.exists() and any(sweep.output_dir.iterdir()):
        raise ConfigError(
            f"sweep folder {sweep.output_dir} exists and is not a sweep; choose another output_dir"
        )
    sweep.output_dir.mkdir(parents=True, exist_ok=True)
    _write_json(plan_path, record)


def _write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (`files.write_json`), keys in the order the sweep gave them."""
    write_json(path, data, indent=1, sort_keys=False, default=str)


# ---------------------------------------------------------------- running


@dataclass
class SweepResult:
    """Records of every variant (finished, failed or not run) and the report's files."""

    output_dir: Path
    records: list[dict[str, Any]]
    files: list[Path]
    interrupted: bool = False


def run_sweep(
    sweep: Sweep,
    *,
    resume: bool = False,
    only: list[str] | None = None,
    show: Callable[[str], None] = print,
) -> SweepResult:
    """Train the variants one after another, then write the report (CSV, JSONL, Markdown, PNGs)."""
    from lorakit.jobs.sweep_report import write_report

    chosen = sweep.variants
    if only:
        names = {v.name for v in sweep.variants}
        unknown = [n for n in only if n not in names]
        if unknown:
            raise ConfigError(f"--only: no variant named {unknown}; variants: {sorted(names)}")
        chosen = [v for v in sweep.variants if v.name in only]
    _prepare_folder(sweep, resume)
    baseline = evaluate_baseline(sweep, show) if sweep.baseline else None
    durations: list[float] = []
    interrupted = False
    for i, variant in enumerate(chosen, 1):
        if (variant.folder / DONE).is_file():
            show(f"[{i}/{len(chosen)}] {variant.name}: finished earlier, skipped")
            continue
        eta = ""
        if durations:
            left = sum(durations) / len(durations) * (len(chosen) - i + 1)
            eta = f" (about {_minutes(left)} left)"
        show(f"[{i}/{len(chosen)}] {variant.name}{eta}")
        start = time.perf_counter()
        record = _run_variant(sweep, variant, show)
        durations.append(time.perf_counter() - start)
        if record.get("status") == "interrupted":
            interrupted = True
            show("sweep interrupted; `lorakit sweep ... --resume` continues it")
            break
    records = [_record_of(v) for v in sweep.variants]
    files = write_report(sweep, records, baseline)
    show(f"report: {sweep.output_dir / 'report.md'}")
    return SweepResult(sweep.output_dir, records, files, interrupted)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _run_variant(sweep: Sweep, variant: Variant, show: Callable[[str], None]) -> dict[str, Any]:
    """Train one variant; its record is written as variant.json, or error.json on failure."""
    from lorakit.jobs.finetune import run_training
    from lorakit.train.checkpoint import latest_checkpoint
    from lorakit.train.runtime import release_memory, resolve_device

    release_memory(resolve_device(variant.run.train.device))  # peak memory: this variant's own
    folder = variant.folder
    resume = "auto" if latest_checkpoint(folder / "checkpoints") is not None else None
    if resume is None and folder.exists():  # a failed or early-stopped try: start it afresh
        shutil.rmtree(folder)
    start = time.perf_counter()
    try:
        # exact match is scored below, on the saved model, with the fixed prompts' answers
        training = variant.run.model_copy(
            update={"eval": variant.run.eval.model_copy(update={"exact_match": False})}
        )
        result = run_training(training, resume=resume, force=False, show=_indented(show))
        if result.interrupted:
            return {"status": "interrupted"}
        record = measure_variant(sweep, variant, result, time.perf_counter() - start)
    except KeyboardInterrupt:
        return {"status": "interrupted"}
    except Exception as error:  # any failure is this variant's alone; the sweep goes on
        record = {
            "name": variant.name,
            "status": "failed",
            "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc(limit=8),
        }
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(folder / FAILED, record)
        show(f"  failed: {record['error']}")
        return record
    _write_json(folder / DONE, record)
    return record


def _indented(show: Callable[[str], None]) -> Callable[[str], None]:
    return lambda text: show("  " + text)


def _record_of(variant: Variant) -> dict[str, Any]:
    """A variant's record as on disk, or a 'not run' placeholder."""
    for name in (DONE, FAILED):
        path = variant.folder / name
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
    return {"name": variant.name, "status": "not run", "overrides": variant.overrides}
