"""peft's state-dict helpers with peft's meaning (peft's `TaskType` is in `fields`).

`get_peft_model_state_dict` returns an adapter's tensors under peft's file key names (the adapter
name dropped, `base_model.model.` in front), exactly what `adapter_model.safetensors` holds;
`set_peft_model_state_dict` copies such a dict into an adapter, after checking it fits.
"""

from __future__ import annotations

from typing import Any

import torch

import lorakit.lora.adapters as adapter_io
from lorakit.errors import AdapterError
from lorakit.lora.adapters import LoadResult
from lorakit.lora.compat.keywords import check_peft_kwargs
from lorakit.lora.model import LoraModel


def get_peft_model_state_dict(
    model: LoraModel,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: str | bool = "auto",
) -> dict[str, torch.Tensor]:
    """The tensors of adapter `adapter_name` under peft's file key names."""
    if state_dict is not None:
        raise AdapterError(
            "get_peft_model_state_dict(state_dict=...) is not supported by lorakit; the adapter's "
            "tensors are read from the model itself: leave state_dict out"
        )
    model._require(adapter_name)
    bias = model.peft_config[adapter_name].bias
    return adapter_io.adapter_state_dict(model.get_base_model(), adapter_name, bias)


def set_peft_model_state_dict(
    model: LoraModel,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    **peft_kwargs: Any,
) -> LoadResult:
    """Copy a dict with peft's file key names into adapter `adapter_name`; shapes must match.

    Returns peft's load result: `missing_keys` are the model's adapter keys (in-memory names)
    the dict did not give, `unexpected_keys` the dict's keys that fit no adapter tensor.
    `peft_kwargs` (`ignore_mismatched_sizes`, `low_cpu_mem_usage`) change nothing.
    """
    check_peft_kwargs("set_peft_model_state_dict", peft_kwargs)
    model._require(adapter_name)
    bias = model.peft_config[adapter_name].bias
    expected = adapter_io.adapter_state_dict(model.get_base_model(), adapter_name, bias)
    given = adapter_io.normalise_keys(peft_model_state_dict)
    unexpected = sorted(set(given) - set(expected))
    for key in sorted(set(given) & set(expected)):
        if tuple(given[key].shape) != tuple(expected[key].shape):
            raise AdapterError(
                f"set_peft_model_state_dict: {key} has shape {list(given[key].shape)} but adapter "
                f"`{adapter_name}` needs {list(expected[key].shape)}"
            )
    kept = {k: v for k, v in given.items() if k in expected}
    adapter_io.copy_into(model.base_model.model, kept, adapter_name)
    unexpected = _load_base_tensors(model, given, unexpected)
    missing = [_in_memory_key(k, adapter_name) for k in sorted(set(expected) - set(given))]
    return LoadResult(missing, unexpected)


@torch.no_grad()
def _load_base_tensors(model: LoraModel, given: dict, keys: list[str]) -> list[str]:
    """As peft does (its load is `load_state_dict(strict=False)` over the whole model), keys
    that name a parameter of the wrapped model (a bias saved with bias='all', say) are copied
    into it; returns the keys that still fit nothing."""
    params = dict(model.get_base_model().named_parameters())
    left = []
    for key in keys:
        prefixed = key.startswith(adapter_io.PREFIX)
        param = params.get(key.removeprefix(adapter_io.PREFIX)) if prefixed else None
        if param is None or tuple(param.shape) != tuple(given[key].shape):
            left.append(key)
        else:
            param.copy_(given[key].to(param.dtype))
    return left


def _in_memory_key(file_key: str, adapter_name: str) -> str:
    path = file_key  # in-memory names are the file names with the adapter name added
    for leaf in (".lora_A.weight", ".lora_B.weight", ".lora_B.bias"):
        if path.endswith(leaf):
            stem, _, tensor = path.rpartition(".")
            return f"{stem}.{adapter_name}.{tensor}"
    for leaf in (".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector"):
        if path.endswith(leaf):
            return f"{path}.{adapter_name}"
    return path
