"""Reading a saved adapter for `from_pretrained` / `load_adapter`: peft's keywords checked, the
files read, and where a `modules_to_save` tensor goes."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

import lorakit.lora.adapters as files
from lorakit.errors import AdapterError, ConfigError
from lorakit.lora.config import LoraConfig
from lorakit.lora.layers import ModulesToSave

# from_pretrained / load_adapter keywords that only say where to put or how to fetch tensors
_PLACEMENT = {"torch_device", "device_map", "max_memory", "offload_folder", "offload_dir",
              "use_safetensors", "local_files_only"}  # fmt: skip
_HUB = {"revision", "cache_dir", "token", "force_download", "proxies", "use_auth_token"}


def read_for_loading(
    model_id: str | Path,
    config: LoraConfig | None,
    ephemeral_gpu_offload: bool,
    key_mapping: dict[str, str] | None,
    kwargs: dict[str, Any],
) -> files.AdapterFiles:
    """The adapter folder's files, with peft's loading keywords checked."""
    subfolder = kwargs.pop("subfolder", None)
    unknown = sorted(set(kwargs) - _PLACEMENT - _HUB)
    if unknown:
        raise TypeError(f"from_pretrained / load_adapter got unexpected keyword(s) {unknown}")
    if ephemeral_gpu_offload:
        raise ConfigError("ephemeral_gpu_offload=True is not supported by lorakit; leave it False")
    if key_mapping:
        raise ConfigError(
            "key_mapping is not supported by lorakit; adapter keys are read as peft writes them"
        )
    directory = Path(model_id) / subfolder if subfolder else Path(model_id)
    if not directory.is_dir() and any(kwargs.get(k) for k in _HUB):
        raise AdapterError(
            f"{directory}: not a local folder; downloading adapters is not supported by lorakit "
            "(fetch the folder first, e.g. with huggingface_hub.snapshot_download)"
        )
    adapter = files.read_adapter(directory)
    if config is not None:
        if not isinstance(config, LoraConfig):
            raise TypeError(f"config: expected a lorakit LoraConfig, got {type(config).__name__}")
        adapter.config = copy.deepcopy(config)
    return adapter


def module_to_save_param(modules: dict, path: str, adapter_name: str) -> torch.Tensor | None:
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = modules.get(".".join(parts[:cut]))
        if isinstance(module, ModulesToSave):
            copy_ = module.modules_to_save[adapter_name]
            return copy_.get_parameter(".".join(parts[cut:])) if parts[cut:] else None
    return None
