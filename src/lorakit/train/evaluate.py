"""Evaluation: loss and perplexity over supervised tokens, exact match, greedy samples.

Eval loss is the mean next-token cross-entropy over every supervised token of the eval set
(tokens, not batches, are weighted equally); perplexity = exp(eval loss).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.ops import causal_lm_loss
from lorakit.train.config import TrainConfig


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put the model in eval mode and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def move_batch(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """The model inputs of a batch (tensors only) on `device`."""
    keys = ("input_ids", "labels", "position_ids", "attention_mask")
    return {k: batch[k].to(device) for k in keys if k in batch and batch[k] is not None}


@torch.no_grad()
def eval_loss(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    device: torch.device | str = "cpu",
    config: TrainConfig | None = None,
) -> dict[str, float]:
    """{'eval_loss', 'perplexity', 'eval_tokens'} over the supervised tokens of `batches`, at
    config.precision, config.loss_chunk_size and at most config.eval_max_batches batches
    (no config: fp32, every batch)."""
    from lorakit.train.runtime import autocast, resolve_precision

    config = config or TrainConfig(precision="fp32")
    device = torch.device(device)
    precision = resolve_precision(config.precision, device)
    chunk_size, max_batches = config.loss_chunk_size, config.eval_max_batches
    total, tokens = 0.0, 0
    with eval_mode(model):
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            with autocast(precision, device):
                loss_sum, n = causal_lm_loss(model, move_batch(batch, device), chunk_size)
            total += float(loss_sum)
            tokens += n
    if tokens == 0:
        raise ValueError("the eval set has no supervised tokens (every label is -100)")
    mean = total / tokens
    ppl = math.exp(mean) if mean < 700 else float("inf")
    return {"eval_loss": mean, "perplexity": ppl, "eval_tokens": tokens}


def exact_match(
    predictions: Sequence[str],
    references: Sequence[str],
    scorer: Callable[[str, str], float] | None = None,
) -> float:
    """Mean score of predictions against references; by default lorakit.data.builtin' normalised
    exact match (case, whitespace, trailing punctuation, first line only)."""
    if len(predictions) != len(references):
        raise ValueError(
            f"exact_match got {len(predictions)} predictions and {len(references)} references"
        )
    if not predictions:
        return float("nan")
    if scorer is None:
        from lorakit.data.builtin import exact_match as scorer
    pairs = zip(predictions, references, strict=True)
    return sum(float(scorer(p, r)) for p, r in pairs) / len(predictions)


def _chat_template(model: nn.Module, tokenizer: Any) -> str | None:
    """The chat template to prompt with: the adapter's, else the tokenizer's."""
    return getattr(model, "chat_template", None) or getattr(tokenizer, "chat_template", None)


def _prompt_ids(tokenizer: Any, messages: list[dict[str, str]], template: str | None) -> list[int]:
    """The token ids that prompt for the answer to a conversation (the template's, when given,
    else the last message's text alone)."""
    if template:
        ids = tokenizer.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=True,
            return_tensors="pt", return_dict=True,
        )["input_ids"]  # fmt: skip
    else:
        ids = tokenizer(messages[-1]["content"], return_tensors="pt")["input_ids"]
    return ids[0].tolist()


@torch.no_grad()
def greedy_answers(
    model: nn.Module,
    tokenizer: Any,
    conversations: Sequence[list[dict[str, str]]],
    template: str | None,
    max_new_tokens: int,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers to conversations (each ends with the user's message), in their order.

    Prompts of similar length are generated together, left-padded, `batch_size` at a time; the
    attention mask hides the padding, so each answer is the one its prompt gets alone.
    """
    device = torch.device(device)
    prompts = [_prompt_ids(tokenizer, messages, template) for messages in conversations]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = [""] * len(prompts)
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            group = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in group)
            ids = torch.full((len(group), width), pad, dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for row, i in enumerate(group):
                n = len(prompts[i])
                ids[row, width - n :] = torch.tensor(prompts[i])
                mask[row, width - n :] = 1
            generated = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
            )  # fmt: skip
            for row, i in enumerate(group):
                out[i] = tokenizer.decode(generated[row, width:], skip_special_tokens=True)
    return out


def generate_samples(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    device: torch.device | str = "cpu",
) -> list[dict[str, str]]:
    """Greedy completions of `prompts` (as user turns of the chat template when there is one)."""
    conversations = [[{"role": "user", "content": prompt}] for prompt in prompts]
    template = _chat_template(model, tokenizer)
    replies = greedy_answers(model, tokenizer, conversations, template, max_new_tokens, device)
    return [{"prompt": p, "completion": c} for p, c in zip(prompts, replies, strict=True)]


def append_samples(path: Path, step: int, samples: list[dict[str, str]]) -> None:
    """Append samples with their step to a samples.jsonl for a person to read."""
    with open(path, "a", encoding="utf-8") as f:
        for sample in samples:
            f.write(json.dumps({"step": step, **sample}, ensure_ascii=False) + "\n")
