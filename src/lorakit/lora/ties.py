"""Tied weights and merging: an adapted layer whose weight another layer shares gets its own copy.

Many causal LMs tie the output layer to the input embedding (`tie_word_embeddings`): one
Parameter serves both. An unmerged adapter on `lm_head` changes the output layer only, since the
embedding still reads the plain weight. Merging it in place would write the update into the
shared Parameter, and so into the embedding too: the merged model would differ from the one
that was trained and evaluated (on a tiny Llama, logits by up to 9). Before a merge, each adapted
layer whose weight is shared gets its own copy, and the model's config stops tying the
embeddings, so that saving and reloading the merged model keeps the two apart.
"""

from __future__ import annotations

import warnings
from collections import Counter

import torch
from torch import nn


def untie_for_merge(
    model: nn.Module, layers: list[tuple[str, nn.Module]], names: list[str], stacklevel: int = 3
) -> list[str]:
    """Give each of `layers` that has one of the adapters `names` and a weight shared with
    another parameter of `model` its own copy of that weight; returns the layers' names."""
    uses = weight_uses(model)
    untied = []
    for name, layer in layers:
        weight = getattr(layer.base_layer, "weight", None)
        if (
            not any(n in layer.r and n not in layer.merged_adapters for n in names)
            or not isinstance(weight, torch.Tensor)
            or not weight.is_floating_point()
            or uses[weight.data_ptr()] < 2
        ):
            continue
        uses[weight.data_ptr()] -= 1
        layer.base_layer.weight = nn.Parameter(
            weight.detach().clone(), requires_grad=weight.requires_grad
        )
        untied.append(name)
    if untied:
        config = getattr(model, "config", None)
        for part in {id(c): c for c in (config, _text_config(config)) if c is not None}.values():
            if getattr(part, "tie_word_embeddings", False):
                part.tie_word_embeddings = False
        warnings.warn(
            f"{', '.join(untied)}: the weight is tied to another layer (tie_word_embeddings); "
            "merging gives it its own copy and sets tie_word_embeddings=False, so that the merge "
            "changes this layer alone, as the unmerged adapter does (the model grows by that copy)",
            stacklevel=stacklevel,
        )
    return untied


def weight_uses(model: nn.Module) -> Counter:
    """How many of `model`'s parameters point at each address: 2 or more for a tied weight."""
    return Counter(
        p.data_ptr() for _, p in model.named_parameters(remove_duplicate=False) if p.numel()
    )


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else None
