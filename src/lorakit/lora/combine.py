"""Combining adapters into a new one (`add_weighted_adapter`), with peft's semantics.

With weights w_i and scalings s_i of adapters (A_i, B_i), the new adapter has scaling 1
(lora_alpha = r). Each method merges a list of task tensors T_i with weights c_i:

- linear / svd: sum_i c_i T_i
- magnitude_prune: the same after keeping the `density` fraction of each T_i's entries largest in
  magnitude (the rest set to 0)
- dare_linear: the same after keeping each entry with probability `density` and dividing what is
  kept by `density` (DARE's random drop and rescale)
- ties / dare_ties: prune as above (by magnitude / at random), elect a sign per entry (the sign of
  sum_i T_i for majority_sign_method='total', of sum_i sign(T_i) for 'frequency', 0 counting as
  +), then average c_i T_i over the tensors whose entry has the elected sign (disjoint merge)

The plain names (linear, ties, dare_linear, dare_ties, magnitude_prune; all ranks equal) merge
the A's with c_i = sign(w_i s_i) sqrt(|w_i s_i|) and the B's with c_i = sqrt(|w_i s_i|).
The `_svd` names (and svd) merge the deltas T_i = s_i B_i A_i with c_i = w_i and take the rank-k
truncated SVD of the result (k = svd_rank or the largest rank): A = Vh_k, B = U_k diag(S_k).
cat: A = concat_rows(w_i s_i A_i), B = concat_cols(B_i), rank = sum of ranks (per layer, so
with `rank_pattern` the new adapter records each layer's own rank); its product is exactly
sum_i w_i s_i B_i A_i.

Random masks come from torch's global generator, drawn as peft draws them: the new adapter's
layers are created first (their default initialisation draws numbers), then layer by layer in
module order, each adapter's A, then each adapter's B (or each delta, for the `_svd` names).
"""

from __future__ import annotations

import copy
import math
import re

import torch

from lorakit.errors import ConfigError, closest
from lorakit.lora.config import LoraConfig
from lorakit.lora.layers import CONVND, LoraLinear

PRUNING = ("ties", "dare_ties", "dare_linear", "magnitude_prune")
COMBINATIONS = ("linear", "cat", "svd", *PRUNING, *(f"{m}_svd" for m in PRUNING))
SIGN_METHODS = ("total", "frequency")


def combine_adapters(
    peft_config: dict[str, LoraConfig],
    layers: list[tuple[str, LoraLinear]],
    *,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str,
    svd_rank: int | None,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> LoraConfig:
    """Create adapter `adapter_name` in each of `layers` holding one of `adapters`; returns its
    config (the caller registers it and sets what is trainable)."""
    _check_arguments(combination_type, density, majority_sign_method)
    if len(adapters) != len(weights) or not adapters:
        raise ConfigError(
            f"give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights"
        )
    if adapter_name in peft_config:
        raise ConfigError(f"an adapter named `{adapter_name}` exists; pick another name")
    configs = [peft_config[a] for a in adapters]
    for name, config in zip(adapters, configs, strict=True):
        if config.use_dora:
            raise ConfigError(
                f"add_weighted_adapter of DoRA adapter `{name}` is not supported by lorakit "
                "(a magnitude vector has no weighted sum); combine plain LoRA adapters"
            )
    if len(adapters) == 1:
        combination_type = "linear"
    method, svd = combination_type.removesuffix("_svd"), combination_type.endswith("svd")
    ranks = {c.r for c in configs} | {r for c in configs for r in c.rank_pattern.values()}
    if not svd and method != "cat" and len(ranks) > 1:
        raise ConfigError(
            f"combination_type={combination_type!r} needs equal ranks, got {sorted(ranks)}; use "
            "'cat' or one of the '_svd' types"
        )
    convs = [n for n, layer in layers if layer.kind == CONVND and set(adapters) & set(layer.r)]
    if svd and convs:
        raise ConfigError(
            f"combination_type={combination_type!r} on the convolution `{convs[0]}` is not "
            "supported by lorakit (peft fails on it too): use 'linear', 'cat' or 'ties'"
        )
    if method == "cat":
        new_rank = sum(c.r for c in configs)
    elif svd:
        new_rank = svd_rank or max(max([c.r, *c.rank_pattern.values()]) for c in configs)
    else:
        new_rank = configs[0].r
    config = copy.deepcopy(configs[0])
    config.r, config.lora_alpha = new_rank, new_rank
    config.rank_pattern, config.alpha_pattern, config.use_rslora = {}, {}, False
    config.target_modules = _union_targets(configs)
    jobs = []
    for name, layer in layers:  # all new layers first, as peft creates them
        present = [(a, w) for a, w in zip(adapters, weights, strict=True) if a in layer.r]
        if not present:
            continue
        rank = sum(layer.r[a] for a, _ in present) if method == "cat" else new_rank
        if rank != new_rank:
            config.rank_pattern[re.escape(name)] = config.alpha_pattern[re.escape(name)] = rank
        layer.update_layer(adapter_name, rank, rank, config.lora_dropout, True)
        jobs.append((layer, present, rank))
    for layer, present, rank in jobs:
        if method == "cat":
            a_new, b_new = _concatenate(layer, present, rank)
        elif svd:
            a_new, b_new = _svd_merge(layer, present, method, rank, density, majority_sign_method)
        else:
            a_new, b_new = _factor_merge(layer, present, method, density, majority_sign_method)
        a_param, b_param = layer.lora_weights(adapter_name)
        with torch.no_grad():
            a_param.copy_(a_new.to(a_param.dtype))
            b_param.copy_(b_new.to(b_param.dtype))
    return config


def _check_arguments(combination_type: str, density: float | None, sign_method: str) -> None:
    if combination_type not in COMBINATIONS:
        raise ConfigError(
            f"combination_type={combination_type!r}: expected one of {', '.join(COMBINATIONS)}"
            + closest(str(combination_type), COMBINATIONS)
        )
    if sign_method not in SIGN_METHODS:
        raise ConfigError(
            f"majority_sign_method={sign_method!r}: expected 'total' (the sign of the summed "
            "values) or 'frequency' (the sign most tensors have)"
        )
    if combination_type.removesuffix("_svd") not in PRUNING:
        return  # density is not used, as in peft
    if density is None:
        raise ConfigError(
            f"combination_type={combination_type!r} needs density, the fraction of each "
            "adapter's values kept (0 < density <= 1), e.g. density=0.5"
        )
    dare = combination_type.startswith("dare")  # DARE divides by density
    number = isinstance(density, (int, float)) and not isinstance(density, bool)
    if not number or not (0 < density <= 1 if dare else 0 <= density <= 1):
        bound = "0 < density <= 1" if dare else "0 <= density <= 1"
        raise ConfigError(
            f"density={density!r}: expected a number with {bound}, the fraction of each "
            "adapter's values kept (1 keeps every value)"
        )


def merge_tasks(
    tensors: list[torch.Tensor],
    weights: list[float],
    method: str,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> torch.Tensor:
    """Merge task tensors of one shape with `method` (linear, svd, or one of PRUNING)."""
    if method in ("ties", "magnitude_prune"):
        tensors = [_keep_largest(t, density) for t in tensors]
    elif method in ("dare_ties", "dare_linear"):
        tensors = [_keep_random(t, density) for t in tensors]
    stacked = torch.stack(tensors)
    scale = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    weighted = stacked * scale.view(-1, *([1] * (stacked.dim() - 1)))
    if method not in ("ties", "dare_ties"):
        return weighted.sum(0)
    signs = stacked.sign()
    votes = stacked.sum(0) if majority_sign_method == "total" else signs.sum(0)
    agree = signs == torch.where(votes >= 0, 1, -1)
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def _keep_largest(t: torch.Tensor, density: float) -> torch.Tensor:
    """`t` with all but its int(density * numel) largest-magnitude entries set to 0."""
    if density >= 1:
        return t
    keep = torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True).indices
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[keep] = 1
    return t * mask.view(t.shape)


def _keep_random(t: torch.Tensor, density: float) -> torch.Tensor:
    """Each entry of `t` kept with probability `density` and divided by it, else 0."""
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density))
    return t * mask / density


def _factor_merge(
    layer: LoraLinear, present: list[tuple[str, float]], method: str, density, sign_method
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the A's and, separately, the B's (equal ranks)."""
    a_list, b_list, a_weights, b_weights = [], [], [], []
    for name, weight in present:
        a, b = (t.detach().float() for t in layer.lora_weights(name))
        scaled = weight * layer.scaling[name]
        a_list.append(a)
        b_list.append(b)
        a_weights.append(math.sqrt(abs(scaled)) * (1.0 if scaled >= 0 else -1.0))
        b_weights.append(math.sqrt(abs(scaled)))
    return (
        merge_tasks(a_list, a_weights, method, density, sign_method),
        merge_tasks(b_list, b_weights, method, density, sign_method),
    )


def _svd_merge(
    layer: LoraLinear, present: list[tuple[str, float]], method: str, rank: int, density, sign
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the deltas (in the base weight's layout, as peft prunes them), then truncate."""
    deltas = [layer.delta_weight(name).detach() for name, _ in present]
    merged = merge_tasks(deltas, [w for _, w in present], method, density, sign)
    if layer.fan_in_fan_out:  # Conv1D and embedding deltas are (in, out)
        merged = merged.T
    u, s, vh = torch.linalg.svd(merged, full_matrices=True)  # (out, out), (k,), (in, in)
    return vh[:rank, :], u[:, :rank] @ torch.diag(s[:rank])


def _concatenate(
    layer: LoraLinear, present: list[tuple[str, float]], rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    a_parts, b_parts = [], []
    for name, weight in present:
        a, b = (t.detach().float() for t in layer.lora_weights(name))
        a_parts.append(a * (weight * layer.scaling[name]))
        b_parts.append(b)
    a_cat, b_cat = torch.cat(a_parts, 0), torch.cat(b_parts, 1)
    a_full = a_cat.new_zeros(rank, *a_cat.shape[1:])  # a convolution's factors keep their
    b_full = b_cat.new_zeros(b_cat.shape[0], rank, *b_cat.shape[2:])  # kernel dimensions
    a_full[: a_cat.shape[0]], b_full[:, : b_cat.shape[1]] = a_cat, b_cat
    return a_full, b_full


def _union_targets(configs: list[LoraConfig]) -> list[str] | str | None:
    targets = [c.target_modules for c in configs]
    if all(isinstance(t, list) for t in targets):
        return sorted({m for t in targets for m in t})
    if all(isinstance(t, str) for t in targets):
        return targets[0] if len(set(targets)) == 1 else "|".join(f"({t})" for t in targets)
    raise ConfigError("cannot combine adapters whose target_modules mix lists and regex strings")
