"""What `lorakit eval` runs: a base model side by side with base + each adapter (eval loss,
perplexity, exact match of greedy answers); `score_answers` is also the end-of-run exact match of
`lorakit train` and of each sweep variant."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.data.builtin import BUILTIN_VARIABLES, exact_match, exact_match_score, name_rate
from lorakit.data.pipeline import (
    DataConfig,
    build_dataset,
    eval_examples,
    prompt_template,
)
from lorakit.lora.model import LoraModel
from lorakit.models import load_model, load_tokenizer
from lorakit.models.vocab import adapter_tokenizer, fit_vocabulary
from lorakit.train.config import TrainConfig
from lorakit.train.evaluate import eval_loss, greedy_answers
from lorakit.train.plan import eval_batches
from lorakit.train.runtime import autocast, resolve_device


def score_answers(
    model: nn.Module,
    tokenizer: Any,
    data: DataConfig,
    max_new_tokens: int,
    device: torch.device,
    precision: str = "bf16",
    answers: bool = False,
) -> dict[str, Any]:
    """Exact match (and the name rate, for the identity task) of greedy answers; `answers`
    adds every answer under `answer_rows`: {where, prompt, expected, got, match}."""
    examples = eval_examples(data)
    template = getattr(model, "chat_template", None) or prompt_template(data, tokenizer)
    model.eval()
    with autocast(precision, device):
        replies = greedy_answers(
            model, tokenizer, [e["messages"] for e in examples], template, max_new_tokens, device
        )
    refs = [e["reference"] for e in examples]
    score: dict[str, Any] = {"exact_match": exact_match_score(replies, refs), "answers": len(refs)}
    if answers:
        score["answer_rows"] = [
            {
                "where": e["where"],
                "prompt": e["messages"][-1]["content"],
                "expected": ref,
                "got": reply,
                "match": exact_match(reply, ref),
            }
            for e, ref, reply in zip(examples, refs, replies, strict=True)
        ]
    if data.dataset == "identity":
        variables = {**BUILTIN_VARIABLES["identity"], **(data.template_vars or {})}
        score["name_rate"] = name_rate(replies, variables["name"])
    return score


def load_with_adapters(
    base: str, adapters: dict[str, Path], dtype: str = "float32", device: str = "cpu"
) -> tuple[nn.Module, Any]:
    """The base model with these adapters loaded (a LoraModel), or the bare base; + tokenizer."""
    tokenizer = adapter_tokenizer(adapters.values()) or load_tokenizer(base)
    model = load_model(base, dtype=dtype, device=device)
    fit_vocabulary(model, tokenizer)  # an adapter trained with added tokens
    if not adapters:
        return model.eval(), tokenizer
    items = list(adapters.items())
    lora = LoraModel.from_pretrained(model, items[0][1], adapter_name=items[0][0])
    for name, path in items[1:]:
        lora.load_adapter(path, name)
    return lora.eval(), tokenizer


def evaluate_models(
    base: str,
    adapters: dict[str, Path],
    data: DataConfig,
    *,
    exact_match: bool = False,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    precision: str = "fp32",
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Eval loss, perplexity (and exact match) of the base, then of base + each adapter."""
    model, tokenizer = load_with_adapters(base, adapters, device=device)
    dev = resolve_device(device)
    batches = eval_batches(
        build_dataset(data.model_copy(update={"packing": False}), tokenizer), batch_size
    )
    rows = []
    for name in [None, *adapters]:
        if isinstance(model, LoraModel) and name is not None:
            model.set_adapter(name)
        with _maybe_disabled(model, name is None):
            row: dict[str, Any] = {"model": "base" if name is None else f"base + {name}"}
            row.update(eval_loss(model, batches, dev, TrainConfig(precision=precision)))
            if exact_match:
                score = score_answers(
                    model, tokenizer, data, max_new_tokens, dev, precision, answers=True
                )
                row.update(score)
        rows.append(row)
    return rows


def _maybe_disabled(model: nn.Module, disable: bool):
    if disable and isinstance(model, LoraModel):
        return model.disable_adapter()
    return contextlib.nullcontext()


def default_eval_data(dataset: str, split: str, limit: int | None) -> DataConfig:
    """The DataConfig `lorakit eval` uses for a dataset name or file."""
    return DataConfig(dataset=dataset, split=split, limit=limit)
