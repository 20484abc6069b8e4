"""Evaluation: loss and perplexity over supervised tokens, greedy answers and samples.

Eval loss is the mean next-token cross-entropy over every supervised token of the eval set
(tokens, not batches, are weighted equally); perplexity = exp(eval loss). A mixture of experts
whose config asks for the router balance term (`train.router`) also gets `eval_aux_loss`, its
token-weighted mean, kept out of the eval loss.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.models.templates import prompt_ids
from lorakit.ops import generation_kwargs
from lorakit.train.config import TrainConfig
from lorakit.train.router import RouterLoss, micro_batch_loss


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
    """{'eval_loss', 'perplexity', 'eval_tokens'} (and 'eval_aux_loss' for an MoE model whose
    config asks for its router balance term) over the supervised tokens of `batches`, at
    config.precision, config.loss_chunk_size and at most config.eval_max_batches batches
    (no config: fp32, every batch)."""
    from lorakit.train.runtime import autocast, resolve_precision

    config = config or TrainConfig(precision="fp32")
    device = torch.device(device)
    precision = resolve_precision(config.precision, device)
    chunk_size, max_batches = config.loss_chunk_size, config.eval_max_batches
    router = RouterLoss.of(model)
    total, aux_total, tokens = 0.0, 0.0, 0
    with eval_mode(model):
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            with autocast(precision, device):
                _, loss_sum, aux, n = micro_batch_loss(
                    model, move_batch(batch, device), chunk_size, 1, router
                )
            total += float(loss_sum)
            aux_total += 0.0 if aux is None else float(aux) * n
            tokens += n
    if tokens == 0:
        raise ValueError("the eval set has no supervised tokens (every label is -100)")
    mean = total / tokens
    ppl = math.exp(mean) if mean < 700 else float("inf")
    metrics = {"eval_loss": mean, "perplexity": ppl, "eval_tokens": tokens}
    return metrics if router is None else {**metrics, "eval_aux_loss": aux_total / tokens}


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
    """Greedy answers to conversations (each ends with the user's message), in their order;
    `template` as `models.templates.prompt_ids` takes it (None: the tokenizer's, else plain).

    Prompts of similar length are generated together, left-padded, `batch_size` at a time; the
    attention mask hides the padding, so each answer is the one its prompt gets alone.
    """
    device = torch.device(device)
    prompts = [prompt_ids(tokenizer, messages, template) for messages in conversations]
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
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                **generation_kwargs(model),
            )
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
    """Greedy completions of `prompts`, each the user's turn of a conversation rendered with the
    adapter's chat template, else as `prompt_ids` renders it (the tokenizer's, else plain)."""
    conversations = [[{"role": "user", "content": prompt}] for prompt in prompts]
    template = getattr(model, "chat_template", None)
    replies = greedy_answers(model, tokenizer, conversations, template, max_new_tokens, device)
    return [{"prompt": p, "completion": c} for p, c in zip(prompts, replies, strict=True)]


def append_samples(path: Path, step: int, samples: list[dict[str, str]]) -> None:
    """Append samples with their step to a samples.jsonl for a person to read."""
    with open(path, "a", encoding="utf-8") as f:
        for sample in samples:
            f.write(json.dumps({"step": step, **sample}, ensure_ascii=False) + "\n")
