"""The adapter directory, in peft's format: `adapter_config.json` + `adapter_model.safetensors`.

File keys are `base_model.model.<module path>.lora_A.weight` (the adapter name dropped), plus
`<path>.base_layer.bias` / `<path>.bias` when biases train and `<path>.<param>` for
`modules_to_save` copies. Loading is strict, checks everything against the base model before
touching it, and never unpickles.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.errors import AdapterError, ConfigError
from lorakit.files import apply_umask, staging_dir
from lorakit.lora.config import LoraConfig
from lorakit.lora.inject import find_modules_to_save, find_targets, is_shared_bias
from lorakit.lora.layers import EMBEDDING, LoraLinear, ModulesToSave, layer_kind

WEIGHTS_NAME = "adapter_model.safetensors"
CHAT_TEMPLATE_NAME = "chat_template.jinja"
PREFIX = "base_model.model."
_PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")


# ----------------------------------------------------------------- saving


def adapter_state_dict(model: nn.Module, adapter_name: str, bias: str) -> dict[str, torch.Tensor]:
    """The tensors of one adapter under peft's file key names."""
    out: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLinear) and adapter_name in module.r:
            a, b = module.lora_weights(adapter_name)
            stem = "lora_embedding_" if module.kind == EMBEDDING else "lora_"
            suffix = "" if module.kind == EMBEDDING else ".weight"
            out[f"{path}.{stem}A{suffix}"] = a
            out[f"{path}.{stem}B{suffix}"] = b
            if bias == "lora_only" and module.base_layer.bias is not None:
                out[f"{path}.base_layer.bias"] = module.base_layer.bias
        elif isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            for key, tensor in module.modules_to_save[adapter_name].state_dict().items():
                out[f"{path}.{key}"] = tensor
    if bias == "all":
        for name, param in model.named_parameters():
            if is_shared_bias(name):
                out[name] = param
    return {PREFIX + k: v.detach().contiguous().cpu() for k, v in out.items()}


def save_adapter(
    model: nn.Module,
    directory: str | Path,
    adapter_name: str,
    config: LoraConfig,
    chat_template: str | None = None,
) -> Path:
    """Write one adapter atomically: a staging directory renamed into place when complete."""
    directory = Path(directory)
    tensors = adapter_state_dict(model, adapter_name, config.bias)
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise AdapterError(
            f"refusing to save adapter `{adapter_name}`: non-finite values in {bad[0]}"
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(directory.parent, f".{directory.name}.tmp-")
    try:
        save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        config.save(staging)
        if chat_template:
            (staging / CHAT_TEMPLATE_NAME).write_text(chat_template)
        apply_umask(staging)
        _fsync_dir(staging)
        if directory.exists():
            _replace_dir(staging, directory)
        else:
            os.replace(staging, directory)
    finally:
        if staging.exists():
            _remove_tree(staging)
    return directory


def _replace_dir(staging: Path, directory: Path) -> None:
    """Swap a complete staging dir in; files of `directory` not written by us are kept."""
    stale = directory / CHAT_TEMPLATE_NAME
    if stale.exists() and not (staging / CHAT_TEMPLATE_NAME).exists():
        stale.unlink()  # a template left from an earlier save would not belong to this adapter
    for item in staging.iterdir():
        os.replace(item, directory / item.name)


def _fsync_dir(directory: Path) -> None:
    for item in directory.iterdir():
        with open(item, "rb") as handle:
            os.fsync(handle.fileno())


def _remove_tree(path: Path) -> None:
    for item in path.iterdir():
        item.unlink()
    path.rmdir()


# ----------------------------------------------------------------- reading


@dataclass
class AdapterFiles:
    """What an adapter directory holds, read and validated as files (not yet against a base)."""

    directory: Path
    config: LoraConfig
    tensors: dict[str, torch.Tensor]
    chat_template: str | None = None


def read_adapter(directory: str | Path) -> AdapterFiles:
    """Read config, tensors and chat template; refuse pickle, name the file on any corruption."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(f"{directory}: adapter directory not found")
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        pickled = [name for name in _PICKLE_NAMES if (directory / name).exists()]
        if pickled:
            raise AdapterError(
                f"{directory / pickled[0]}: pickle adapter files can run code when loaded and are "
                "refused. Convert it where you trust it: `from safetensors.torch import save_file; "
                f"save_file(torch.load(path, weights_only=True), '{WEIGHTS_NAME}')`"
            )
        raise AdapterError(f"{weights}: not found (an adapter needs {WEIGHTS_NAME})")
    config = LoraConfig.load(directory)
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise AdapterError(
            f"{weights}: not a readable safetensors file ({error}); the file is truncated or "
            "corrupt: save the adapter again"
        ) from None
    template_path = directory / CHAT_TEMPLATE_NAME
    template = template_path.read_text() if template_path.is_file() else None
    return AdapterFiles(directory, config, tensors, template)


# ----------------------------------------------------------------- checking against a base


@dataclass
class AdapterCheck:
    """The result of checking an adapter against a base model: expected keys and shapes."""

    expected: dict[str, tuple[int, ...]] = field(default_factory=dict)
    target_names: list[str] = field(default_factory=list)
    to_save_names: list[str] = field(default_factory=list)


def expected_shapes(model: nn.Module, config: LoraConfig) -> AdapterCheck:
    """File keys and shapes an adapter with `config` must have for `model` (model untouched)."""
    check = AdapterCheck()
    for name, module in find_targets(model, config):
        r = config.rank_for(name)
        kind = layer_kind(module)
        base = module.base_layer if isinstance(module, LoraLinear) else module
        if kind == EMBEDDING:
            n_in, n_out = base.num_embeddings, base.embedding_dim
            check.expected[f"{name}.lora_embedding_A"] = (r, n_in)
            check.expected[f"{name}.lora_embedding_B"] = (n_out, r)
        else:
            n_in, n_out = _in_out(base, kind)
            check.expected[f"{name}.lora_A.weight"] = (r, n_in)
            check.expected[f"{name}.lora_B.weight"] = (n_out, r)
        if config.bias == "lora_only" and getattr(base, "bias", None) is not None:
            check.expected[f"{name}.base_layer.bias"] = tuple(base.bias.shape)
        check.target_names.append(name)
    for name, module in find_modules_to_save(model, config):
        source = module.original_module if isinstance(module, ModulesToSave) else module
        for key, tensor in source.state_dict().items():
            check.expected[f"{name}.{key}"] = tuple(tensor.shape)
        check.to_save_names.append(name)
    if config.bias == "all":
        targets = set(check.target_names)
        for pname, param in model.named_parameters():
            if not is_shared_bias(pname):
                continue
            owner = pname.rsplit(".", 1)[0].removesuffix(".base_layer")
            key = f"{owner}.base_layer.bias" if owner in targets else pname
            check.expected[key] = tuple(param.shape)
    check.expected = {PREFIX + k: v for k, v in check.expected.items()}
    return check


def _in_out(base: nn.Module, kind: str) -> tuple[int, int]:
    if kind == "conv1d":
        n_in, n_out = base.weight.shape
        return n_in, n_out
    return base.in_features, base.out_features


def normalise_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the extra copies some writers add (`original_module`, `modules_to_save` aliases)."""
    return {k: v for k, v in tensors.items() if ".original_module." not in k and (
        ".modules_to_save." not in k
    )}  # fmt: skip


def check_adapter(model: nn.Module, adapter: str | Path | AdapterFiles) -> AdapterCheck:
    """Raise `AdapterError` unless the adapter fits `model` exactly (keys, shapes, targets)."""
    files = adapter if isinstance(adapter, AdapterFiles) else read_adapter(adapter)
    where = files.directory / WEIGHTS_NAME
    base = getattr(model, "base_model", model) if hasattr(model, "peft_config") else model
    try:
        check = expected_shapes(base, files.config)
    except ConfigError as error:
        raise AdapterError(
            f"{files.directory}: the adapter does not fit this base: {error}"
        ) from None
    tensors = normalise_keys(files.tensors)
    for key, shape in check.expected.items():
        if key not in tensors:
            raise AdapterError(
                f"{where}: missing key {key} (expected shape {list(shape)}); the file is "
                "incomplete or was saved for another model"
            )
        got = tuple(tensors[key].shape)
        if got != shape:
            raise AdapterError(
                f"{where}: {key} has shape {list(got)} but this base needs {list(shape)}; "
                "the adapter was trained for another base model or rank"
            )
    unexpected = sorted(set(tensors) - set(check.expected))
    if unexpected:
        raise AdapterError(
            f"{where}: unexpected key {unexpected[0]} ({len(unexpected)} in all): the base has no "
            "such module for this adapter config (another base model, or a config/weights mismatch)"
        )
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise AdapterError(f"{where}: {key} holds non-finite values (NaN/inf)")
    return check
