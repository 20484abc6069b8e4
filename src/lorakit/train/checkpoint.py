"""Training checkpoints: safetensors + JSON only, written atomically, found again on resume.

A checkpoint is a directory `checkpoints/step-XXXXXXXX/` holding

    trainable.safetensors   every trainable parameter by its module path (exact resume)
    optimizer.safetensors   optimizer tensors, keys `state.<param index>.<name>`
    rng.safetensors         torch CPU (and CUDA) generator states
    state.json              step, data position, schedule, optimizer scalars, Python/NumPy RNG,
                            the resolved config
    adapter/                the adapter in the peft format, when the model is a LoraModel
    COMPLETE                written last, before the directory is renamed into place

It is written with `files.atomic_dir` (staged, fsynced, renamed); a directory without
`COMPLETE` (a crash mid-write) is never picked for resume. state.json holds the sha256 of each
tensor file, so a checkpoint damaged later is found out: resume='auto' then takes the newest one
that reads back whole. The `final/` and `best/` folders are written the same way, minus
`COMPLETE`: they hold only what peft and transformers load.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.errors import ConfigError
from lorakit.files import atomic_dir, write_json
from lorakit.train.rundir import check_fresh_dir, clean_leftovers, ended_unfinished

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def is_complete(path: Path) -> bool:
    """True for a checkpoint directory that was fully written."""
    return (path / MARKER).is_file() and (path / "state.json").is_file()


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories under `root`, oldest first."""
    if not Path(root).is_dir():
        return []
    found = []
    for path in Path(root).iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and is_complete(path):
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and stale staging dirs."""
    complete = list_checkpoints(root)
    for path in complete[: max(0, len(complete) - keep)]:
        shutil.rmtree(path, ignore_errors=True)
    clean_leftovers(Path(root))


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name, detached, contiguous copies."""
    return {
        name: p.detach().contiguous().clone()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def load_trainable_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable parameters back, insisting on the same set of names and shapes."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(tensors):
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise ConfigError(
            f"checkpoint parameters do not match the model: missing {missing[:3]}, "
            f"unexpected {extra[:3]}; resume with the same model and adapter config"
        )
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != tensors[name].shape:
                raise ConfigError(
                    f"checkpoint parameter {name} has shape {tuple(tensors[name].shape)}, "
                    f"the model has {tuple(p.shape)}"
                )
            p.copy_(tensors[name])


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON scalars."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    seen: set[tuple] = set()  # a tensor shared between parameters is written once per use
    for index, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().contiguous().cpu()
                where = (value.untyped_storage().data_ptr(), value.storage_offset())
                tensors[f"state.{index}.{key}"] = value.clone() if where in seen else value
                seen.add(where)
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    """Load what `optimizer_to_flat` wrote back into `optimizer`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Generator states: torch ones as tensors, Python's and NumPy's as JSON."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    scalars = {
        "python": [version, list(internal), gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    return tensors, scalars


def set_rng_state(tensors: dict[str, torch.Tensor], scalars: dict) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    version, internal, gauss = scalars["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = scalars["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


TENSOR_FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors")


def _sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    model_files: bool = True,
) -> Path:
    """Write one checkpoint atomically at `path` and return it; `model_files` adds the
    loadable adapter (or model folder) under `adapter/`."""
    with atomic_dir(path, marker=MARKER) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        opt_tensors, opt_meta = optimizer_to_flat(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng_tensors, rng_scalars = rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        files = {name: _sha256(tmp / name) for name in TENSOR_FILES}
        write_json(
            tmp / "state.json", dict(state, optimizer=opt_meta, rng=rng_scalars, files=files)
        )
        if model_files:
            save_model_files(model, tmp / "adapter")
    return path


class DamagedCheckpoint(ConfigError):
    """A checkpoint marked complete whose files do not read back whole."""


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Everything a resume needs from one checkpoint, read and checked before anything is
    restored: {'state': state.json, and the tensors of each TENSOR_FILES name}."""
    path = Path(path)
    if not is_complete(path):
        raise ConfigError(f"checkpoint {path} is incomplete (no {MARKER} marker); pick another")
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        for name, digest in state.get("files", {}).items():
            if _sha256(path / name) != digest:
                raise DamagedCheckpoint(f"checkpoint {path}: {name} has changed since it was saved")
        tensors = {name: load_file(str(path / name)) for name in TENSOR_FILES}
        missing = sorted({"step", "settings", "optimizer", "rng"} - set(state))
        if missing:
            raise DamagedCheckpoint(f"checkpoint {path}: state.json lacks {', '.join(missing)}")
    except DamagedCheckpoint:
        raise
    except (OSError, ValueError, TypeError, AttributeError, SafetensorError) as err:
        raise DamagedCheckpoint(f"checkpoint {path} cannot be read: {err}") from err
    return {"state": state, **tensors}


def restore_checkpoint(saved: dict[str, Any], model: nn.Module, optimizer) -> dict:
    """Put what `read_checkpoint` read back into the model, optimizer and generators."""
    state = saved["state"]
    load_trainable_state(model, saved["trainable.safetensors"])
    optimizer_from_flat(optimizer, saved["optimizer.safetensors"], state["optimizer"])
    set_rng_state(saved["rng.safetensors"], state["rng"])
    return state


def read_resume(path: Path, fall_back: bool) -> tuple[Path, dict[str, Any], list[str]]:
    """Read the checkpoint at `path`; with `fall_back`, a damaged one gives way to the newest
    older one that reads whole. Returns (the checkpoint read, its contents, why each newer one
    was skipped)."""
    older = [p for p in reversed(list_checkpoints(path.parent)) if p.name < path.name]
    skipped: list[str] = []
    for candidate in [path, *older] if fall_back else [path]:
        try:
            return candidate, read_checkpoint(candidate), skipped
        except DamagedCheckpoint as err:
            if not fall_back:
                raise DamagedCheckpoint(f"{err}; resume from another checkpoint") from err
            skipped.append(f"skipped {err}")
    raise DamagedCheckpoint(
        f"no checkpoint under {path.parent} reads back whole ({'; '.join(skipped)}); start a "
        "new run in a new output_dir"
    )


def save_model_files(model: nn.Module, path: Path) -> None:
    """Save what a user loads later: the peft-format adapter of a LoraModel, or for full
    fine-tuning the Hugging Face model folder (safetensors)."""
    from lorakit.ops import unwrap_causal_lm

    if hasattr(model, "save_pretrained"):
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(path))
        return
    lm = unwrap_causal_lm(model)
    if hasattr(lm, "save_pretrained"):
        lm.save_pretrained(str(path))
    else:  # a plain nn.Module: its trainable tensors
        path.mkdir(parents=True, exist_ok=True)
        save_file(trainable_state(model), str(path / "model.safetensors"))


def save_final(path: Path, model: nn.Module, extra: dict[str, Any] | None = None) -> Path:
    """Atomically write the loadable model files (adapter or model folder) at `path`, plus the
    JSON files in `extra` ({name: data}); no checkpoint marker, so the folder is what a user
    loads."""
    with atomic_dir(path) as tmp:
        save_model_files(model, tmp)
        for name, data in (extra or {}).items():
            write_json(tmp / name, data)
    return path


# Fields that may change between a run and its resume without changing the result (`compile`
# changes rounding and, with dropout, which masks are drawn, not the recipe; checkpoints from
# before it existed have no such key).
RESUME_FREE = {
    "compile",
    "eval_every",
    "eval_max_batches",
    "eval_prompts",
    "eval_max_new_tokens",
    "save_every",
    "keep_checkpoints",
    "log_every",
    "progress",
    "tensorboard",
    "device",
    "plots",
}


def resume_differences(saved: dict, now: dict) -> list[str]:
    """'key: saved -> now' for every result-changing setting that differs."""
    keys = sorted((set(saved) | set(now)) - RESUME_FREE)
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]


def find_resume(output_dir: Path, resume: str | Path | bool | None) -> Path | None:
    """The checkpoint to resume from: None, 'auto'/True (newest complete one), or a path.
    A run that starts afresh refuses a directory holding files it would write, unless 'auto'
    finds them left by a run that ended before its first checkpoint."""
    root = output_dir / "checkpoints"
    if resume in (None, False):
        if latest_checkpoint(root) is not None:
            raise ConfigError(
                f"{output_dir} holds checkpoints of an earlier run; continue it with "
                "`lorakit train ... --resume auto` (train(..., resume='auto') in Python), start "
                "it over with `--overwrite`, or choose a new output_dir"
            )
        check_fresh_dir(output_dir)
        return None
    if resume in ("auto", True):
        found = latest_checkpoint(root)
        if found is None and not ended_unfinished(output_dir):  # else: that run starts over
            check_fresh_dir(output_dir)
        return found
    path = Path(resume)
    if not is_complete(path):
        raise ConfigError(
            f"resume={str(resume)!r} is not a complete checkpoint directory (it needs state.json "
            f"and {MARKER}); complete ones here: {[p.name for p in list_checkpoints(root)]}"
        )
    if path.resolve().parent != root.resolve():  # another run's checkpoint: a new directory
        check_fresh_dir(output_dir)
    return path
