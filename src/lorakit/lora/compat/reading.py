"""Reading a saved adapter for `from_pretrained` / `load_adapter`: peft's keywords checked
(`keywords`), the files read, and where a `modules_to_save` tensor goes."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lorakit.lora.adapters as adapter_io
from lorakit.errors import AdapterError
from lorakit.lora.compat.keywords import HUB, check_peft_kwargs
from lorakit.lora.config import LoraConfig


def read_for_loading(
    model_id: str | Path,
    config: LoraConfig | None,
    function: str,
    peft_kwargs: dict[str, Any],
) -> adapter_io.AdapterFiles:
    """The adapter folder's files (`model_id`, or its `subfolder=`), with the peft keywords of
    `function` (from_pretrained / load_adapter) checked."""
    peft_kwargs = dict(peft_kwargs)
    subfolder = peft_kwargs.pop("subfolder", None)
    check_peft_kwargs(function, peft_kwargs)
    directory = Path(model_id) / subfolder if subfolder else Path(model_id)
    if not directory.is_dir() and any(peft_kwargs.get(k) for k in HUB):
        raise AdapterError(
            f"{directory}: not a local folder; downloading adapters is not supported by lorakit "
            "(fetch the folder first, e.g. with huggingface_hub.snapshot_download)"
        )
    adapter = adapter_io.read_adapter(directory)
    if config is not None:
        if not isinstance(config, LoraConfig):
            raise TypeError(f"config: expected a lorakit LoraConfig, got {type(config).__name__}")
        adapter.config = copy.deepcopy(config)
    return adapter
