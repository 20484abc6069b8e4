"""What `lorakit eval` runs: a base model side by side with base + each adapter (eval loss,
perplexity, exact match of greedy answers, ordinary facts kept); `score_answers` is also the
end-of-run exact match of `lorakit train` and of each sweep variant, `ordinary_facts` the
forgetting measure of every sweep variant."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.data.builtin import (
    BUILTIN_VARIABLES,
    GENERAL_FACTS,
    exact_match,
    exact_match_score,
    keeps_fact,
    name_rate,
)
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


def ordinary_facts(
    model: nn.Module, tokenizer: Any, template: str, device: torch.device, max_new_tokens: int = 32
) -> list[dict[str, Any]]:
    """The built-in model's held-out factual questions (`GENERAL_FACTS`) answered greedily:
    {prompt, facts, got, kept}, `kept` when the answer still states its key fact in a complete
    sentence (`keeps_fact`)."""
    questions = list(GENERAL_FACTS)
    conversations = [[{"role": "user", "content": q}] for q in questions]
    replies = greedy_answers(model, tokenizer, conversations, template, max_new_tokens, device)
    return [
        {
            "prompt": q,
            "facts": list(GENERAL_FACTS[q]),
            "got": r,
            "kept": keeps_fact(r, GENERAL_FACTS[q]),
        }
        for q, r in zip(questions, replies, strict=True)
    ]


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
    facts: bool = False,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    precision: str = "fp32",
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Eval loss, perplexity (exact match, ordinary facts kept) of the base, then of base + each
    adapter."""
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
            if facts:
                template = getattr(model, "chat_template", None) or prompt_template(data, tokenizer)
                with autocast(precision, dev):
                    answers = ordinary_facts(model.eval(), tokenizer, template, dev)
                row["facts_kept"] = sum(a["kept"] for a in answers) / len(answers)
                row["fact_rows"] = answers
        rows.append(row)
    return rows


def _maybe_disabled(model: nn.Module, disable: bool):
    if disable and isinstance(model, LoraModel):
        return model.disable_adapter()
    return contextlib.nullcontext()


def default_eval_data(dataset: str, split: str, limit: int | None) -> DataConfig:
    """The DataConfig `lorakit eval` uses for a dataset name or file."""
    return DataConfig(dataset=dataset, split=split, limit=limit)
