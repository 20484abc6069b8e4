"""`lorakit quickstart`: teach the built-in model a new name, and show it worked.

On the built-in model and the built-in `identity` dataset: ask held-out "who are you" questions
(English and Chinese), measure the eval loss, fine-tune a LoRA adapter, then ask and measure
again. The defaults were tuned to finish in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.data.builtin import IDENTITY_DEFAULTS
from lorakit.data.pipeline import DataConfig, build_dataset, eval_examples, name_rate
from lorakit.errors import ConfigError
from lorakit.lora.config import LoraConfig
from lorakit.lora.model import get_peft_model
from lorakit.lora.presets import target_preset
from lorakit.models import BUILTIN_MODEL, chat_template_of, load_model, load_tokenizer
from lorakit.train.evaluate import eval_loss, generate_samples
from lorakit.train.loop import TrainConfig, train
from lorakit.train.plan import eval_batches
from lorakit.train.runtime import resolve_device

MARKER = "quickstart.json"
# fp32: with batches of short conversations (~400 tokens a step) bf16 matmuls on CPUs without
# AMX were measured far slower than fp32 (the lm_head backward alone: 6.5 s vs ~0.1 s).
PRECISION = "fp32"
# Held-out questions (the identity `test` split): three in English, two in Chinese.
QUESTIONS = [
    "What do you call yourself?",
    "Tell me who you are.",
    "Who is your developer?",
    "你叫啥？",
    "你能做个自我介绍吗？",
]


@dataclass
class QuickstartSettings:
    """The knobs of the quickstart run (defaults: the measured, reliable setting)."""

    output_dir: Path = Path("runs/quickstart")
    steps: int = 30
    batch_size: int = 8
    lr: float = 1e-3
    r: int = 16
    lora_alpha: float = 32
    name: str = IDENTITY_DEFAULTS["name"]
    author: str = IDENTITY_DEFAULTS["author"]
    max_new_tokens: int = 32
    overwrite: bool = False
    progress: str = "auto"
    questions: list[str] = field(default_factory=lambda: list(QUESTIONS))


@dataclass
class QuickstartResult:
    """What the quickstart measured and where it wrote its files."""

    output_dir: Path
    adapter_dir: Path
    before: list[dict[str, str]]
    after: list[dict[str, str]]
    eval_loss_before: float
    eval_loss_after: float
    name_rate_before: float
    name_rate_after: float
    seconds: float
    plots: list[Path] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (paths as strings)."""
        out = dict(self.__dict__)
        for key in ("output_dir", "adapter_dir"):
            out[key] = str(out[key])
        out["plots"] = [str(p) for p in self.plots]
        return out


def prepare_output(settings: QuickstartSettings) -> Path:
    """The run directory; an earlier quickstart there is replaced only with `overwrite`."""
    out = settings.output_dir
    if out.exists() and any(out.iterdir()):
        if not settings.overwrite:
            raise ConfigError(
                f"{out} is not empty; pass --overwrite to replace an earlier quickstart there, "
                "or --output DIR for a new directory"
            )
        if not (out / MARKER).is_file():
            raise ConfigError(
                f"{out} is not empty and was not written by `lorakit quickstart`; refusing to "
                "delete it. Choose another --output"
            )
        shutil.rmtree(out)
    return out


def _answers(model, tokenizer, settings: QuickstartSettings, device) -> list[dict[str, str]]:
    """Greedy answers to the held-out questions."""
    return generate_samples(model, tokenizer, settings.questions, settings.max_new_tokens, device)


def run_quickstart(
    settings: QuickstartSettings, show: Callable[[str], None] = print
) -> QuickstartResult:
    """Before answers and eval loss, LoRA fine-tuning, after answers and eval loss."""
    start = time.perf_counter()
    out = prepare_output(settings)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"status": "running"}) + "\n")
    device = resolve_device("cpu")
    variables = {"name": settings.name, "author": settings.author}
    data = DataConfig(dataset="identity", max_length=256, template_vars=variables)
    test = data.model_copy(update={"split": "test"})
    unseen = {e["messages"][-1]["content"] for e in eval_examples(data)}
    leaked = [q for q in settings.questions if q in unseen]
    if leaked:
        raise ConfigError(f"quickstart questions must be held out; in the train set: {leaked}")

    show(f"Loading the built-in model {BUILTIN_MODEL} ...")
    tokenizer = load_tokenizer(BUILTIN_MODEL)
    model = load_model(BUILTIN_MODEL, dtype="float32")
    train_set, eval_set = build_dataset(data, tokenizer), build_dataset(test, tokenizer)
    evals = eval_batches(eval_set, settings.batch_size)

    lora = get_peft_model(
        model,
        LoraConfig(
            r=settings.r, lora_alpha=settings.lora_alpha, target_modules=target_preset(model)
        ),
    )
    lora.chat_template = chat_template_of(tokenizer)

    show("\nBefore fine-tuning, the base model answers:")
    with lora.disable_adapter():
        before = _answers(lora, tokenizer, settings, device)
        loss_before = eval_loss(lora, evals, device, PRECISION)["eval_loss"]
    _show_answers(before, show)
    show(f"eval loss on {len(eval_set)} held-out questions: {loss_before:.3f}")

    trainable, total = lora.get_nb_trainable_parameters()
    show(
        f"\nFine-tuning a LoRA adapter (r={settings.r}, {trainable:,} of {total:,} parameters) "
        f"on {len(train_set)} identity conversations for {settings.steps} steps ..."
    )
    config = TrainConfig(
        max_steps=settings.steps,
        batch_size=settings.batch_size,
        lr=settings.lr,
        warmup_steps=max(1, settings.steps // 10),
        precision=PRECISION,
        progress=settings.progress,
        log_every=5,
        tensorboard=False,
    )
    result = train(lora, tokenizer, train_set, eval_set, config, out)
    loss_after = [r for r in result.history if r.get("kind") == "eval"][-1]["eval_loss"]

    show("\nAfter fine-tuning, the model answers:")
    after = _answers(lora, tokenizer, settings, device)
    _show_answers(after, show)
    summary = QuickstartResult(
        output_dir=out,
        adapter_dir=result.final_dir or out / "final",
        before=before,
        after=after,
        eval_loss_before=loss_before,
        eval_loss_after=loss_after,
        name_rate_before=name_rate([a["completion"] for a in before], settings.name),
        name_rate_after=name_rate([a["completion"] for a in after], settings.name),
        seconds=time.perf_counter() - start,
        plots=sorted((out / "plots").glob("*.png")),
    )
    _write_answers(out / "answers.jsonl", before, after)
    (out / MARKER).write_text(json.dumps(summary.to_dict(), ensure_ascii=False, indent=2) + "\n")
    _show_summary(summary, settings, show)
    return summary


def _show_answers(samples: list[dict[str, str]], show: Callable[[str], None]) -> None:
    for sample in samples:
        answer = " ".join(sample["completion"].split())
        show(f"  Q: {sample['prompt']}\n  A: {answer}")


def _write_answers(path: Path, before: list[dict], after: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for b, a in zip(before, after, strict=True):
            row = {"question": b["prompt"], "before": b["completion"], "after": a["completion"]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _show_summary(
    result: QuickstartResult, settings: QuickstartSettings, show: Callable[[str], None]
) -> None:
    n = len(result.after)
    show(
        f"\neval loss: {result.eval_loss_before:.3f} before -> {result.eval_loss_after:.3f} after"
        f"\nanswers naming `{settings.name}`: {round(result.name_rate_before * n)}/{n} before -> "
        f"{round(result.name_rate_after * n)}/{n} after"
        f"\ntime: {result.seconds:.0f} s"
        f"\n\nadapter:  {result.adapter_dir}"
        f"\nplots:    {', '.join(str(p) for p in result.plots) or '(none)'}"
        f"\nsamples:  {result.output_dir / 'answers.jsonl'}"
        f"\nmetrics:  {result.output_dir / 'metrics.jsonl'}"
        f"\n\nnext: lorakit chat {BUILTIN_MODEL} --adapter {result.adapter_dir}"
        f"\n      lorakit merge {BUILTIN_MODEL} {result.adapter_dir} "
        f"{result.output_dir / 'merged'}"
    )
