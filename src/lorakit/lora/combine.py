"""Combining adapters into a new one (`add_weighted_adapter`), with peft's semantics.

With weights w_i and scalings s_i of adapters (A_i, B_i), the new adapter has scaling 1
(lora_alpha = r) and:

- linear (all ranks equal): A = sum_i sign(w_i) sqrt(|w_i s_i|) A_i, B = sum_i sqrt(|w_i s_i|) B_i
- cat: A = concat_rows(w_i s_i A_i), B = concat_cols(B_i), rank = sum of ranks (per layer, so
  with `rank_pattern` the new adapter records each layer's own rank); the product is exactly
  sum_i w_i s_i B_i A_i
- svd: the rank-k truncated SVD of sum_i w_i s_i B_i A_i (k = svd_rank or the largest rank)
"""

from __future__ import annotations

import copy
import math
import re

import torch

from lorakit.errors import ConfigError
from lorakit.lora.config import LoraConfig
from lorakit.lora.layers import LoraLinear

COMBINATIONS = ("linear", "cat", "svd")


def combine_adapters(
    peft_config: dict[str, LoraConfig],
    layers: list[tuple[str, LoraLinear]],
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str,
    svd_rank: int | None,
) -> LoraConfig:
    """Create adapter `adapter_name` in each of `layers` holding one of `adapters`; returns its
    config (the caller registers it and sets what is trainable)."""
    if combination_type not in COMBINATIONS:
        raise ConfigError(f"combination_type={combination_type!r}: expected one of {COMBINATIONS}")
    if len(adapters) != len(weights) or not adapters:
        raise ConfigError(
            f"give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights"
        )
    if adapter_name in peft_config:
        raise ConfigError(f"an adapter named `{adapter_name}` exists; pick another name")
    configs = [peft_config[a] for a in adapters]
    if len(adapters) == 1:
        combination_type = "linear"
    ranks = {c.r for c in configs} | {r for c in configs for r in c.rank_pattern.values()}
    if combination_type == "linear" and len(ranks) > 1:
        raise ConfigError(
            f"combination_type='linear' needs equal ranks, got {sorted(ranks)}; use 'cat' or 'svd'"
        )
    new_rank = {
        "linear": configs[0].r,
        "cat": sum(c.r for c in configs),
        "svd": svd_rank or max(c.r for c in configs),
    }[combination_type]
    config = copy.deepcopy(configs[0])
    config.r, config.lora_alpha = new_rank, new_rank
    config.rank_pattern, config.alpha_pattern, config.use_rslora = {}, {}, False
    config.target_modules = _union_targets(configs)
    for name, layer in layers:
        present = [(a, w) for a, w in zip(adapters, weights, strict=True) if a in layer.r]
        if not present:
            continue
        rank = new_rank
        if combination_type == "cat":  # with rank_pattern, each layer's own ranks add up
            rank = sum(layer.r[a] for a, _ in present)
        if rank != new_rank:
            config.rank_pattern[re.escape(name)] = config.alpha_pattern[re.escape(name)] = rank
        layer.update_layer(adapter_name, rank, rank, config.lora_dropout, True)
        a_new, b_new = _combine_layer(layer, present, combination_type, rank)
        a_param, b_param = layer.lora_weights(adapter_name)
        with torch.no_grad():
            a_param.copy_(a_new.to(a_param.dtype))
            b_param.copy_(b_new.to(b_param.dtype))
    return config


def _combine_layer(
    layer: LoraLinear, present: list[tuple[str, float]], kind: str, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the combined adapter in one layer: A (rank × in), B (out × rank)."""
    if kind == "svd":
        delta = sum(w * layer.lora_weights(a)[1].float() @ layer.lora_weights(a)[0].float()
                    * layer.scaling[a] for a, w in present)  # fmt: skip
        u, s, vh = torch.linalg.svd(delta, full_matrices=True)  # (out, out), (k,), (in, in)
        return vh[:rank, :], u[:, :rank] @ torch.diag(s[:rank])
    a_parts, b_parts = [], []
    for name, weight in present:
        a, b = (t.detach().float() for t in layer.lora_weights(name))
        scaled = weight * layer.scaling[name]
        if kind == "cat":
            a_parts.append(a * scaled)
            b_parts.append(b)
        else:
            sign = 1.0 if scaled >= 0 else -1.0
            a_parts.append(a * math.sqrt(abs(scaled)) * sign)
            b_parts.append(b * math.sqrt(abs(scaled)))
    if kind == "linear":
        return sum(a_parts), sum(b_parts)
    a_cat, b_cat = torch.cat(a_parts, 0), torch.cat(b_parts, 1)
    a_full = torch.zeros(rank, a_cat.shape[1])
    b_full = torch.zeros(b_cat.shape[0], rank)
    a_full[: a_cat.shape[0]], b_full[:, : b_cat.shape[1]] = a_cat, b_cat
    return a_full, b_full


def _union_targets(configs: list[LoraConfig]) -> list[str] | str | None:
    targets = [c.target_modules for c in configs]
    if all(isinstance(t, list) for t in targets):
        return sorted({m for t in targets for m in t})
    if all(isinstance(t, str) for t in targets):
        return targets[0] if len(set(targets)) == 1 else "|".join(f"({t})" for t in targets)
    raise ConfigError("cannot combine adapters whose target_modules mix lists and regex strings")
