"""Preference tuning: DPO, ORPO and SimPO over (chosen, rejected) pairs, in the loop's steps.

A batch holds 2B rows, the B chosen sides then the B rejected sides (`data.preference`); each
row's labels mark its answer. With log p(y|x) the sum of the answer tokens' log-probabilities
(`sequence_logps`), and `avg` that sum over the answer's token count:

- **dpo** (sigmoid): with the reference log-probabilities r(y|x) of the same network with its
  adapter switched off (`disable_adapter`, under no_grad: never a second copy of the base),
  z = beta * ((log p(yc) - r(yc)) - (log p(yr) - r(yr))) and the pair's loss is
  -(1 - eps) log sigmoid(z) - eps log sigmoid(-z) (eps = label_smoothing, conservative DPO).
  rewards = beta * (log p - r). **ipo**: (h - 1 / (2 beta))^2 with h the same margin taken per
  answer token (as TRL does).
- **orpo**: no reference. log odds = (avg_c - avg_r) - (log(1 - e^avg_c) - log(1 - e^avg_r));
  loss = NLL of the chosen rows - beta * log sigmoid(log odds); rewards = beta * avg. The NLL
  covers the chosen row's every token, prompt included, as TRL's `ORPOTrainer` computes it.
- **simpo**: no reference. z = beta * (avg_c - avg_r) - simpo_gamma; loss as DPO's with
  label smoothing, plus cpo_alpha * NLL of the chosen answers; rewards = beta * avg.

The pair terms are averaged over the pairs of the global batch, the NLL over its tokens (as
TRL's trainers do), so gradient accumulation and the number of processes change
nothing but speed. Every metric a DPO user reads (rewards/chosen, rewards/rejected,
rewards/margins, rewards/accuracies, logps/chosen, logps/rejected) is a mean over pairs; the
log-probabilities are sums for dpo and per-token means for orpo and simpo, as TRL logs them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import ConfigError
from lorakit.ops import IGNORE_INDEX, supervised_targets, unwrap_causal_lm
from lorakit.ops import _fsdp as is_sharded
from lorakit.train.config import PreferenceConfig

METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


@dataclass
class PairLosses:
    """One micro-batch's terms: the per-pair losses, the chosen answers' summed NLL (already
    weighted; zero when the method has none) and per-pair metrics."""

    pairs: torch.Tensor  # (B,)
    nll_sum: torch.Tensor  # ()
    metrics: dict[str, torch.Tensor]  # name -> (B,)


def check_preference_model(model: nn.Module, config: PreferenceConfig) -> None:
    """DPO's reference is the model with its adapter off: refuse a model without one."""
    if config.method == "dpo" and not hasattr(model, "disable_adapter"):
        raise ConfigError(
            "preference method dpo needs a LoRA model: its reference is the same network with "
            "the adapter switched off. Wrap the model with get_peft_model (method: dpo in a run "
            "config does), or use method orpo or simpo, which need no reference"
        )


def sequence_logps(
    model: nn.Module, batch: dict[str, torch.Tensor], whole_rows: int = 0
) -> tuple[torch.Tensor, ...]:
    """(summed log-probability of each row's supervised tokens, their count), both (rows,);
    with `whole_rows` = n, also the summed log-probability of the first n rows' every token
    (prompt and answer, padding excluded: ORPO's NLL term) and its token count.

    The output head runs on the scored positions only (the decoder's hidden states gathered
    there), so no (rows, length, vocabulary) logits are held, as `ops.causal_lm_loss` does."""
    masks = [supervised_targets(batch["labels"], batch.get("position_ids"))[0]]
    if whole_rows:
        labels = batch["input_ids"].clone()
        labels[whole_rows:] = IGNORE_INDEX
        if batch.get("attention_mask") is not None:
            labels = labels.masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        masks.append(supervised_targets(labels, batch.get("position_ids"))[0])
    scored = masks[0] | masks[-1]  # (rows, T): positions whose next token is scored
    targets = torch.roll(batch["input_ids"], -1, dims=1)[scored]  # labels equal ids there
    token_logps = -F.cross_entropy(_scored_logits(model, batch, scored), targets, reduction="none")
    rows, n = scored.nonzero()[:, 0], batch["input_ids"].shape[0]
    out: tuple[torch.Tensor, ...] = ()
    for mask, size in zip(masks, (n, whole_rows), strict=False):
        keep = mask[scored]  # the scored positions this mask counts
        sums = token_logps.new_zeros(n).index_add(0, rows[keep], token_logps[keep])
        counts = torch.bincount(rows[keep], minlength=n).to(sums.dtype)
        out += (sums[:size], counts[:size])
    return out


def _scored_logits(
    model: nn.Module, batch: dict[str, torch.Tensor], scored: torch.Tensor
) -> torch.Tensor:
    """fp32 logits (N, V) at the `scored` positions: the head on the gathered hidden states,
    or the whole forward for a model without a separate head (or a softcapped or sharded one)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    lm = unwrap_causal_lm(model)
    decoder, head = lm.base_model, lm.get_output_embeddings()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    if softcap or decoder is lm or head is None or is_sharded(lm):
        return model(**inputs, use_cache=False).logits[scored].float()
    hidden = decoder(**inputs, use_cache=False).last_hidden_state
    return head(hidden[scored]).float()


def _rows(value: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return None if value is None else value[:n]


@torch.no_grad()
def reference_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed answer log-probabilities under the reference: the same model, adapter off, in eval
    mode (no dropout)."""
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            return sequence_logps(model, batch)[0]
    finally:
        model.train(was_training)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _smoothed(z: torch.Tensor, eps: float) -> torch.Tensor:
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def pair_losses(
    model: nn.Module, batch: dict[str, torch.Tensor], config: PreferenceConfig
) -> PairLosses:
    """The method's terms for one micro-batch of 2B rows (chosen rows, then rejected)."""
    n = batch["input_ids"].shape[0] // 2
    sums, counts, *whole = sequence_logps(model, batch, n if config.method == "orpo" else 0)
    chosen, rejected = sums.chunk(2)
    n_chosen, n_rejected = counts.chunk(2)
    avg_c, avg_r = chosen / n_chosen.clamp(min=1), rejected / n_rejected.clamp(min=1)
    beta, zero = config.beta, sums.new_zeros(())
    if config.method == "dpo":
        ref_c, ref_r = reference_logps(model, batch).chunk(2)
        reward_c, reward_r = beta * (chosen - ref_c), beta * (rejected - ref_r)
        if config.loss_type == "ipo":
            h = (chosen - ref_c) / n_chosen.clamp(min=1) - (rejected - ref_r) / n_rejected.clamp(
                min=1
            )
            pairs = (h - 1 / (2 * beta)) ** 2
        else:
            pairs = _smoothed(reward_c - reward_r, config.label_smoothing)
        nll = zero
    elif config.method == "orpo":
        log_odds = (avg_c - avg_r) - (_log1mexp(avg_c) - _log1mexp(avg_r))
        pairs = -beta * F.logsigmoid(log_odds)
        reward_c, reward_r, nll = beta * avg_c, beta * avg_r, -whole[0].sum()
    else:  # simpo
        pairs = _smoothed(beta * (avg_c - avg_r) - config.simpo_gamma, config.label_smoothing)
        reward_c, reward_r = beta * avg_c, beta * avg_r
        nll = -config.cpo_alpha * chosen.sum() if config.cpo_alpha else zero
    reward_c, reward_r = reward_c.detach(), reward_r.detach()
    metrics = {
        "rewards/chosen": reward_c,
        "rewards/rejected": reward_r,
        "rewards/margins": reward_c - reward_r,
        "rewards/accuracies": (reward_c > reward_r).to(sums.dtype),
        # TRL's names: dpo logs summed log-probabilities, orpo / simpo per-token means
        "logps/chosen": (chosen if config.method == "dpo" else avg_c).detach(),
        "logps/rejected": (rejected if config.method == "dpo" else avg_r).detach(),
    }
    return PairLosses(pairs, nll, metrics)


def batch_sizes(batches: Iterable[dict[str, Any]], method: str = "dpo") -> tuple[int, int]:
    """(pairs, tokens the NLL term averages over) over micro-batches: the chosen answers'
    tokens, or for orpo the chosen rows' every token (as TRL's ORPO)."""
    pairs = tokens = 0
    for batch in batches:
        n = batch["input_ids"].shape[0] // 2
        labels = batch["labels"][:n]
        if method == "orpo":
            labels = batch["input_ids"][:n]
            if batch.get("attention_mask") is not None:
                labels = labels.masked_fill(batch["attention_mask"][:n] == 0, -100)
        mask, _ = supervised_targets(labels, _rows(batch.get("position_ids"), n))
        pairs, tokens = pairs + n, tokens + int(mask.sum())
    return pairs, tokens


def combine(
    terms: PairLosses, n_pairs: int, n_tokens: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """This micro-batch's share of the global batch's loss (pairs over n_pairs, NLL over the
    chosen answer tokens n_tokens), and its metric sums (with the pairs' loss sum as `loss`)."""
    loss = terms.pairs.sum() / n_pairs + terms.nll_sum / max(n_tokens, 1)
    sums = {name: float(v.sum()) for name, v in terms.metrics.items()}
    return loss, sums


@torch.no_grad()
def preference_eval(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    config: PreferenceConfig,
    *,
    device: torch.device,
    max_batches: int | None,
    autocast: Any = contextlib.nullcontext,
) -> dict[str, float]:
    """The method's loss and metrics over eval pairs, named as TRL names them (`eval_loss`,
    `eval_rewards/chosen`, ...); the model's mode is restored."""
    from lorakit.train.evaluate import eval_mode, move_batch

    batches = [move_batch(b, device) for i, b in enumerate(batches) if not _past(i, max_batches)]
    n_pairs, n_tokens = batch_sizes(batches, config.method)
    if n_pairs == 0:
        raise ValueError("the eval set has no preference pairs")
    total, sums = 0.0, dict.fromkeys(METRICS, 0.0)
    with eval_mode(model):
        for batch in batches:
            with autocast():
                loss, part = combine(pair_losses(model, batch, config), n_pairs, n_tokens)
            total += float(loss)
            for name, value in part.items():
                sums[name] += value
    return {"eval_loss": total, **{f"eval_{k}": v / n_pairs for k, v in sums.items()}}


def _past(index: int, limit: int | None) -> bool:
    return limit is not None and index >= limit
