"""Whole embedding and head weights in an adapter file, next to the token rows.

peft writes the whole input embedding and output head into an adapter whose base vocabulary was
grown (`save_embedding_layers="auto"`): the rows the resize added are random, and without them
the adapter would not reproduce the model. lorakit writes them only where the adapter's token
rows (`lora.tokens`) do not already hold every added row, and reads them where peft wrote them:
`<layer>.token_adapter.base_layer.weight` for a layer with token rows, `<layer>.weight`
otherwise, and a tied head's copy of the embedding's rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from lorakit.lora.tokens import (
    DELTA,
    TrainableTokens,
    head_layer,
    input_embedding,
    layer_name,
    tied_heads,
    token_layers,
)

if TYPE_CHECKING:
    from lorakit.lora.config import LoraConfig

# peft writes the whole embedding and head weights into an adapter whose base vocabulary was
# resized (`save_embedding_layers="auto"`): the rows added by the resize are random, and the
# adapter would not reproduce the model without them. lorakit writes them only where the
# adapter's token rows do not already hold every added row.

BASE_WEIGHT = "token_adapter.base_layer.weight"


def _vocab_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the input embedding and of an output head it does not share."""
    found = []
    for getter in (input_embedding, head_layer):
        module = getter(model)
        name = layer_name(model, module)
        if name is not None and all(m is not module for _, m in found):
            found.append((name, module))
    return found


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, TrainableTokens) else module


def whole_layer_keys(model: nn.Module, config: LoraConfig) -> dict[str, tuple[int, ...]]:
    """Keys (no prefix) and shapes of the whole-layer copies an adapter file may carry: the
    embedding's and head's weights, and a tied head's copy of the embedding's rows."""
    keys = {}
    wrapped = token_layers(model, config) if config.trainable_token_indices else {}
    heads = tied_heads(model, config, wrapped) if wrapped else []
    for name, module in _vocab_layers(model):
        weight = getattr(_base(module), "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        inside = name in wrapped or name in heads
        keys[f"{name}.{BASE_WEIGHT}" if inside else f"{name}.weight"] = tuple(weight.shape)
    for head in heads:
        embedding = layer_name(model, input_embedding(model))
        keys[f"{head}.{DELTA}"] = (
            len(wrapped[embedding]),
            _base(head_layer(model)).weight.shape[1],
        )
    return keys


def whole_copy_target(model: nn.Module, key: str) -> torch.Tensor:
    """The base weight a whole-layer key (no prefix) names, wrapped or not."""
    name = key.removesuffix(".weight").removesuffix(".token_adapter.base_layer")
    return _base(model.get_submodule(name)).weight


def whole_layers(
    model: nn.Module, config: LoraConfig, adapter_name: str, mode: str | bool = "auto"
) -> dict[str, torch.Tensor]:
    """The whole-layer tensors to write with adapter `adapter_name` (no prefix): all of them
    with `mode=True`, none with False; with 'auto', when the base's vocabulary on disk is
    smaller than the model's and the adapter's rows miss some of the added rows."""
    if mode is False or (mode == "auto" and not _rows_missing(model, config, adapter_name)):
        return {}
    out = {}
    for key in whole_layer_keys(model, config):
        if key.endswith(DELTA):
            out[key] = input_embedding(model).trainable_tokens_delta[adapter_name]
        else:
            out[key] = whole_copy_target(model, key)
    return out


def _rows_missing(model: nn.Module, config: LoraConfig, adapter_name: str) -> bool:
    """Whether the base vocabulary was grown and some added row of the embedding or of an
    untied head is not among the adapter's token rows."""
    before = _vocab_on_disk(config.base_model_name_or_path)
    if before is None:
        return False
    for _, module in _vocab_layers(model):
        rows = _base(module).weight.shape[0]
        held = (
            module.token_indices.get(adapter_name, [])
            if isinstance(module, TrainableTokens)
            else []
        )
        if rows > before and not set(range(before, rows)) <= set(held):
            return True
    return False


def _vocab_on_disk(name_or_path: str | None) -> int | None:
    """The vocabulary size the base model's config.json (a local folder) gives, else None."""
    if not name_or_path or not (Path(name_or_path) / "config.json").is_file():
        return None
    try:
        data = json.loads((Path(name_or_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    size = data.get("vocab_size") or (data.get("text_config") or {}).get("vocab_size")
    return size if isinstance(size, int) else None


@torch.no_grad()
def refresh_originals(model: nn.Module, adapter_name: str) -> None:
    """After whole-layer copies were loaded into the base weights: the rows an unmerge puts
    back are the base's new ones."""
    for module in model.modules():
        if not isinstance(module, TrainableTokens) or module.tied:
            continue
        if adapter_name in module.trainable_tokens_delta:
            weight = module.base_layer.weight
            index = torch.tensor(module.token_indices[adapter_name], device=weight.device)
            originals = module.token_adapter.trainable_tokens_original
            originals.get(adapter_name).copy_(weight[index])
