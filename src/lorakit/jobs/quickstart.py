"""`lorakit quickstart`: teach the built-in model a new name, and show that it stays useful.

On the built-in model: ask held-out questions of two kinds, "who are you" (English and Chinese)
and ordinary ones (a fact, a short task), fine-tune a LoRA adapter, then ask again. The training
data mixes the built-in `identity` rows with the built-in `general` rows, the base model's own
answers to ordinary questions: without them the adapter learns to answer every message with its
name (they are repeated `general_repeats` times, so that they weigh about as much as the
identity rows). Both halves are measured: identity answers that name the new identity, and
ordinary answers that keep the base model's key fact (Paris, 24 hours: `data.builtin.keeps_fact`)
in a complete sentence without the new name; and the answer loss on held-out ordinary questions
before and after, the measure of forgetting. The defaults were chosen so that both hold with a
margin, on fp32 and bf16.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.data.builtin import GENERAL_FACTS, IDENTITY_DEFAULTS, keeps_fact, name_rate
from lorakit.data.pipeline import (
    DataConfig,
    TokenizedDataset,
    build_dataset,
    eval_examples,
)
from lorakit.errors import ConfigError
from lorakit.lora.config import LoraConfig
from lorakit.lora.model import get_peft_model
from lorakit.lora.presets import target_preset
from lorakit.models import BUILTIN_MODEL, chat_template_of, load_model, load_tokenizer
from lorakit.train.config import TrainConfig
from lorakit.train.evaluate import eval_loss, generate_samples
from lorakit.train.loop import train
from lorakit.train.plan import eval_batches
from lorakit.train.runtime import autocast, resolve_device, seed_everything

MARKER = "quickstart.json"
# fp32 by default: with batches of short conversations (~400 tokens a step) bf16 matmuls on CPUs
# without AMX were measured far slower than fp32 (the lm_head backward alone: 6.5 s vs ~0.1 s).
PRECISION = "fp32"
SEED = 0  # the adapter's random start and the batch order
ASK_BATCH = 8  # questions generated together
# Held-out identity questions (the identity `test` split): three in English, two in Chinese.
QUESTIONS = [
    "What do you call yourself?",
    "Tell me who you are.",
    "Who is your developer?",
    "你叫啥？",
    "你能做个自我介绍吗？",
]
# Held-out ordinary questions (the general `test` split), each with a key fact the base model
# states: the answer after fine-tuning must still state it.
ORDINARY = list(GENERAL_FACTS)


@dataclass
class QuickstartSettings:
    """The knobs of the quickstart run (defaults: the measured, reliable setting)."""

    output_dir: Path = Path("runs/quickstart")
    steps: int = 30
    batch_size: int = 8
    lr: float = 1e-3
    r: int = 16
    lora_alpha: float = 32
    general_repeats: int = 4  # the ordinary rows' weight in the mix
    # Attention only: adapters on the feed-forward layers too carried the general rows'
    # "X is approximately N" onto held-out number questions (measured, identity 5/5 both ways:
    # 12 of 16 facts kept with all projections, 15 with attention only; docs/benchmarks.md).
    # None: the model's preset (all projections).
    target_modules: list[str] | None = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    precision: str = PRECISION
    name: str = IDENTITY_DEFAULTS["name"]
    author: str = IDENTITY_DEFAULTS["author"]
    max_new_tokens: int = 32
    overwrite: bool = False
    progress: str = "auto"
    questions: list[str] = field(default_factory=lambda: list(QUESTIONS))
    ordinary: list[str] = field(default_factory=lambda: list(ORDINARY))


@dataclass
class QuickstartResult:
    """What the quickstart measured and where it wrote its files."""

    output_dir: Path
    adapter_dir: Path
    before: list[dict[str, str]]  # identity answers
    after: list[dict[str, str]]
    ordinary_before: list[dict[str, str]]
    ordinary_after: list[dict[str, str]]
    eval_loss_before: float  # identity test split
    eval_loss_after: float
    general_loss_before: float  # general test split
    general_loss_after: float
    name_rate_before: float  # identity answers naming the new name
    name_rate_after: float
    ordinary_kept_before: float  # ordinary answers stating their key fact (keeps_fact)
    ordinary_kept_after: float
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


def mentions(text: str, name: str) -> bool:
    """Whether an answer names `name` (case-insensitive)."""
    return name.lower() in text.lower()


def kept_rate(samples: list[dict[str, str]], name: str) -> float:
    """Share of ordinary answers that keep their question's key fact (`GENERAL_FACTS`) in a
    complete, non-looping sentence that does not name `name`."""
    good = [keeps_fact(s["completion"], GENERAL_FACTS[s["prompt"]], name) for s in samples]
    return sum(good) / max(len(good), 1)


def check_held_out(settings: QuickstartSettings, identity: DataConfig, general: DataConfig) -> None:
    """The questions asked before and after must not be in the training data."""
    for questions, data in ((settings.questions, identity), (settings.ordinary, general)):
        seen = {e["messages"][-1]["content"] for e in eval_examples(data)}
        leaked = [q for q in questions if q in seen]
        if leaked:
            raise ConfigError(f"quickstart questions must be held out; in the train set: {leaked}")


def mix(first: TokenizedDataset, second: TokenizedDataset, repeats: int = 1) -> TokenizedDataset:
    """One dataset holding the samples of both, the second's `repeats` times (batches are
    shuffled across them), as a list (the two small built-in sets, read from their stores)."""
    return dataclasses.replace(
        first,
        samples=list(first.samples) + list(second.samples) * repeats,
        source=f"{first.source} + {second.source}" + (f" x{repeats}" if repeats > 1 else ""),
        rows_total=first.rows_total + second.rows_total * repeats,
        skipped=first.skipped + second.skipped,
        truncated=first.truncated + second.truncated,
    )


def ask(model, tokenizer, questions: list[str], settings, device, show) -> list[dict[str, str]]:
    """Greedy answers, generated `ASK_BATCH` questions at a time (each answer is the one its
    question gets alone) and shown as soon as their batch is done, with the batch's time."""
    samples = []
    for first in range(0, len(questions), ASK_BATCH):
        batch = questions[first : first + ASK_BATCH]
        start = time.perf_counter()
        with autocast(settings.precision, device):  # bf16: the base is stored in bf16
            answers = generate_samples(model, tokenizer, batch, settings.max_new_tokens, device)
        seconds = time.perf_counter() - start
        for i, (question, sample) in enumerate(zip(batch, answers, strict=True), first + 1):
            show(f"  [{i}/{len(questions)}, {seconds:.0f} s] Q: {question}")
            show(f"  A: {' '.join(sample['completion'].split())}")
        samples += answers
    return samples


def run_quickstart(
    settings: QuickstartSettings, show: Callable[[str], None] = print
) -> QuickstartResult:
    """Before answers and losses, LoRA fine-tuning on identity + general rows, after the same."""
    start = time.perf_counter()
    out = prepare_output(settings)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"status": "running"}) + "\n")
    device = resolve_device("cpu")
    variables = {"name": settings.name, "author": settings.author}
    identity = DataConfig(dataset="identity", max_length=256, template_vars=variables)
    general = DataConfig(dataset="general", max_length=256)
    check_held_out(settings, identity, general)

    show(f"Loading the built-in model {BUILTIN_MODEL} ...")
    tokenizer = load_tokenizer(BUILTIN_MODEL)
    model = load_model(BUILTIN_MODEL, dtype="float32")
    identity_set, general_set = (
        build_dataset(identity, tokenizer),
        build_dataset(general, tokenizer),
    )
    train_set = mix(identity_set, general_set, settings.general_repeats)
    eval_set = build_dataset(identity.model_copy(update={"split": "test"}), tokenizer)
    general_test = build_dataset(general.model_copy(update={"split": "test"}), tokenizer)
    general_evals = eval_batches(general_test, settings.batch_size)

    seed_everything(SEED)  # lora_A's random start: every quickstart trains the same adapter
    lora = get_peft_model(
        model,
        LoraConfig(
            r=settings.r,
            lora_alpha=settings.lora_alpha,
            target_modules=settings.target_modules or target_preset(model),
        ),
    )
    lora.chat_template = chat_template_of(tokenizer)

    show("\nBefore fine-tuning, the base model answers (held-out questions):")
    with lora.disable_adapter():
        before = ask(lora, tokenizer, settings.questions, settings, device, show)
        ordinary_before = ask(lora, tokenizer, settings.ordinary, settings, device, show)
        general_before = _loss(lora, general_evals, device, settings)

    trainable, total = lora.get_nb_trainable_parameters()
    show(
        f"\nFine-tuning a LoRA adapter (r={settings.r}, {trainable:,} of {total:,} parameters) "
        f"for {settings.steps} steps on {len(identity_set)} identity conversations mixed with "
        f"{len(general_set)} ordinary ones x{settings.general_repeats} (the base model's own "
        f"answers, so that it stays useful), {settings.precision} ..."
    )
    config = TrainConfig(
        max_steps=settings.steps,
        batch_size=settings.batch_size,
        lr=settings.lr,
        warmup_steps=max(1, settings.steps // 10),
        precision=settings.precision,
        progress=settings.progress,
        log_every=5,
        tensorboard=False,
        seed=SEED,
    )
    result = train(lora, tokenizer, train_set, eval_set, config, out)
    evals = [r for r in result.history if r.get("kind") == "eval"]

    show("\nAfter fine-tuning, the model answers:")
    after = ask(lora, tokenizer, settings.questions, settings, device, show)
    ordinary_after = ask(lora, tokenizer, settings.ordinary, settings, device, show)
    summary = QuickstartResult(
        output_dir=out,
        adapter_dir=result.final_dir or out / "final",
        before=before,
        after=after,
        ordinary_before=ordinary_before,
        ordinary_after=ordinary_after,
        eval_loss_before=evals[0]["eval_loss"],
        eval_loss_after=evals[-1]["eval_loss"],
        general_loss_before=general_before,
        general_loss_after=_loss(lora, general_evals, device, settings),
        name_rate_before=name_rate(_texts(before), settings.name),
        name_rate_after=name_rate(_texts(after), settings.name),
        ordinary_kept_before=kept_rate(ordinary_before, settings.name),
        ordinary_kept_after=kept_rate(ordinary_after, settings.name),
        seconds=time.perf_counter() - start,
        plots=sorted((out / "plots").glob("*.png")),
    )
    _write_answers(out / "answers.jsonl", before + ordinary_before, after + ordinary_after)
    (out / MARKER).write_text(json.dumps(summary.to_dict(), ensure_ascii=False, indent=2) + "\n")
    _show_summary(summary, settings, show)
    return summary


def _loss(model, batches, device, settings: QuickstartSettings) -> float:
    """The answer loss of held-out questions at the run's precision."""
    return eval_loss(model, batches, device, TrainConfig(precision=settings.precision))["eval_loss"]


def _texts(samples: list[dict[str, str]]) -> list[str]:
    return [s["completion"] for s in samples]


def _write_answers(path: Path, before: list[dict], after: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for b, a in zip(before, after, strict=True):
            row = {"question": b["prompt"], "before": b["completion"], "after": a["completion"]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _show_summary(
    result: QuickstartResult, settings: QuickstartSettings, show: Callable[[str], None]
) -> None:
    n, m = len(result.after), len(result.ordinary_after)
    show(
        f"\nidentity questions naming `{settings.name}`: {round(result.name_rate_before * n)}/{n}"
        f" before -> {round(result.name_rate_after * n)}/{n} after"
        f"\nordinary questions keeping the base model's key fact (Paris, 24 hours, ...) in a "
        f"complete sentence: "
        f"{round(result.ordinary_kept_before * m)}/{m} before -> "
        f"{round(result.ordinary_kept_after * m)}/{m} after"
        f"\neval loss, identity questions: {result.eval_loss_before:.3f} before -> "
        f"{result.eval_loss_after:.3f} after"
        f"\neval loss, ordinary questions: {result.general_loss_before:.3f} before -> "
        f"{result.general_loss_after:.3f} after"
        f"\ntime: {result.seconds:.0f} s"
        f"\n\nadapter:  {result.adapter_dir}"
        f"\nplots:    {', '.join(str(p) for p in result.plots) or '(none)'}"
        f"\nsamples:  {result.output_dir / 'answers.jsonl'}"
        f"\nmetrics:  {result.output_dir / 'metrics.jsonl'}"
        f"\n\nnext: lorakit chat {BUILTIN_MODEL} --adapter {result.adapter_dir}"
        f"\n      lorakit merge {BUILTIN_MODEL} {result.adapter_dir} "
        f"{result.output_dir / 'merged'}"
    )
