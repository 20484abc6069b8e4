"""What a sweep measures: one finished variant's numbers for the report (`measure_variant`:
speed, memory, losses and the train/eval gap, parameter counts, size on disk, exact match and
answers of the saved final model, what it forgot) and the untrained base model's
(`evaluate_baseline`).

Forgetting (`forgetting`): the answer loss on the built-in general questions' held-out split
(the base model's own answers, so the base scores its lowest there) and the share of the
factual ones whose greedy answer still states the key fact (`data.builtin.keeps_fact`)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.files import write_json
from lorakit.jobs.run_config import RunConfig

if TYPE_CHECKING:
    from lorakit.jobs.sweep import Sweep, Variant

BASELINE = "baseline.json"


def measure_variant(sweep: Sweep, variant: Variant, result: Any, wall_s: float) -> dict[str, Any]:
    """Everything the report shows about one finished variant."""
    from lorakit.train.log import read_metrics

    run = variant.run
    rows = read_metrics(Path(run.output_dir) / "metrics.jsonl")
    train_rows = [r for r in rows if r.get("kind", "train") == "train"]
    eval_rows = [r for r in rows if r.get("kind") == "eval" and r["step"] > 0]  # trained
    train_s = sum(r.get("step_s", 0.0) for r in train_rows)
    tokens = sum(r.get("tokens", 0) for r in train_rows)
    record: dict[str, Any] = {
        "name": variant.name,
        "status": "finished",
        "overrides": variant.overrides,
        "method": run.method,
        "steps": result.steps,
        "wall_s": wall_s,
        "train_s": train_s,
        "tokens_per_s": tokens / train_s if train_s else None,
        "peak_memory_mb": max((r.get("memory_mb", 0.0) for r in train_rows), default=None),
        "final_train_loss": _tail_mean([r["loss"] for r in train_rows]),
        "final_eval_loss": eval_rows[-1]["eval_loss"] if eval_rows else None,
        "best_eval_loss": min((r["eval_loss"] for r in eval_rows), default=None),
        "final_perplexity": eval_rows[-1].get("perplexity") if eval_rows else None,
        "gap": loss_gap(train_rows, eval_rows),
        "curve": {
            "train": [[r["step"], r["loss"]] for r in train_rows],
            "eval": [[r["step"], r["eval_loss"]] for r in rows if r.get("kind") == "eval"],
        },
    }
    record.update(_evaluate_final(sweep, run, result))
    return record


def _tail_mean(losses: list[float], share: float = 0.1) -> float | None:
    """Mean of the last 10% of step losses (at least one): the end of a noisy curve."""
    if not losses:
        return None
    n = max(1, math.ceil(len(losses) * share))
    return sum(losses[-n:]) / n


def loss_gap(train_rows: list[dict], eval_rows: list[dict]) -> list[list[float]]:
    """[step, eval loss - mean train loss since the previous evaluation] at every evaluation."""
    gaps, previous = [], 0
    for row in eval_rows:
        window = [r["loss"] for r in train_rows if previous < r["step"] <= row["step"]]
        if window:
            gaps.append([row["step"], row["eval_loss"] - sum(window) / len(window)])
        previous = row["step"]
    return gaps


def _evaluate_final(sweep: Sweep, run: RunConfig, result: Any) -> dict[str, Any]:
    """Parameter counts, size on disk, exact match and answers of the saved final model."""
    from lorakit.train.runtime import resolve_device

    final = result.final_dir
    if final is None:
        return {}
    model, tokenizer = _load_final(run, final)
    device = resolve_device(run.train.device)
    model.to(device)
    out: dict[str, Any] = {"adapter_bytes": _folder_bytes(final)}
    total = sum(p.numel() for p in _base_parameters(model))
    if run.method == "full":
        out["trainable_params"] = total
        out["total_params"] = total
    else:
        trainable = _adapter_parameters(final)
        out["trainable_params"] = trainable
        out["total_params"] = total + trainable
    out["trainable_pct"] = 100 * out["trainable_params"] / out["total_params"]
    eval_config = run.eval_data_config()
    if eval_config is not None and run.eval.exact_match:
        out.update(score_answers_fp32(model, tokenizer, eval_config, run, device))
    out["answers"] = _answers(sweep, model, tokenizer, run, device)
    out.update(forgetting(model, tokenizer, run, device))
    return out


def evaluate_baseline(sweep: Sweep, show: Callable[[str], None]) -> dict[str, Any]:
    """The untrained base model's eval loss, exact match and answers (once; kept on disk)."""
    from lorakit.data.pipeline import build_dataset
    from lorakit.jobs.evaluation import load_with_adapters
    from lorakit.train.config import TrainConfig
    from lorakit.train.evaluate import eval_loss
    from lorakit.train.plan import eval_batches
    from lorakit.train.runtime import resolve_device

    path = sweep.output_dir / BASELINE
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    run = sweep.variants[0].run
    show(f"base model (no training): {run.model.name_or_path}")
    model, tokenizer = load_with_adapters(run.model.name_or_path, {})
    device = resolve_device(run.train.device)
    model.to(device)
    out: dict[str, Any] = {}
    eval_config = run.eval_data_config()
    if eval_config is not None:
        data = build_dataset(eval_config, tokenizer)
        batches = eval_batches(data, run.train.batch_size)
        settings = TrainConfig(precision="fp32", eval_max_batches=run.train.eval_max_batches)
        scores = eval_loss(model, batches, device, settings)
        out["best_eval_loss"] = out["final_eval_loss"] = scores.get("eval_loss")
        out["final_perplexity"] = scores.get("perplexity")
        if run.eval.exact_match:
            out.update(score_answers_fp32(model, tokenizer, eval_config, run, device))
    out["answers"] = _answers(sweep, model, tokenizer, run, device)
    out.update(forgetting(model, tokenizer, run, device))
    write_json(path, out, indent=1, sort_keys=False, default=str)
    return out


def score_answers_fp32(model: Any, tokenizer: Any, eval_config: Any, run: RunConfig, device: Any):
    """Exact match of greedy answers, computed in fp32 (the same for every variant)."""
    from lorakit.jobs.evaluation import score_answers

    score = score_answers(
        model, tokenizer, eval_config, run.eval.max_new_tokens, device, precision="fp32"
    )
    score["exact_match_questions"] = score.pop("answers")  # "answers" holds the prompts' answers
    return score


def forgetting(model: Any, tokenizer: Any, run: RunConfig, device: Any) -> dict[str, float]:
    """{'general_loss', 'facts_kept'}: the held-out general questions' answer loss (fp32) and
    the share of factual answers keeping their key fact (greedy, 32 new tokens)."""
    from lorakit.data.pipeline import DataConfig, build_dataset, prompt_template
    from lorakit.jobs.evaluation import ordinary_facts
    from lorakit.train.config import TrainConfig
    from lorakit.train.evaluate import eval_loss
    from lorakit.train.plan import eval_batches

    general = DataConfig(dataset="general", split="test", max_length=256)
    batches = eval_batches(build_dataset(general, tokenizer), run.train.batch_size)
    loss = eval_loss(model, batches, device, TrainConfig(precision="fp32"))["eval_loss"]
    template = getattr(model, "chat_template", None) or prompt_template(run.data, tokenizer)
    kept = [a["kept"] for a in ordinary_facts(model, tokenizer, template, device)]
    return {"general_loss": loss, "facts_kept": sum(kept) / len(kept)}


def _answers(sweep: Sweep, model: Any, tokenizer: Any, run: RunConfig, device: Any) -> list:
    """Greedy answers to the sweep's fixed prompts."""
    from lorakit.data.pipeline import prompt_template
    from lorakit.train.evaluate import greedy_answers

    template = getattr(model, "chat_template", None) or prompt_template(run.data, tokenizer)
    conversations = [[{"role": "user", "content": p}] for p in sweep.prompts]
    replies = greedy_answers(
        model, tokenizer, conversations, template, sweep.max_new_tokens, device
    )
    return [{"prompt": p, "answer": a} for p, a in zip(sweep.prompts, replies, strict=True)]


def _load_final(run: RunConfig, final: Path):
    """The trained model as saved: base + adapter (LoRA) or the whole folder (full)."""
    from lorakit.jobs.evaluation import load_with_adapters
    from lorakit.models import load_model, load_tokenizer

    if run.method == "full":
        return load_model(str(final), dtype="float32").eval(), load_tokenizer(str(final))
    model, tokenizer = load_with_adapters(run.model.name_or_path, {"default": final})
    return model, tokenizer


def _base_parameters(model: Any):
    """Parameters of the base model (without LoRA matrices)."""
    return [p for n, p in model.named_parameters() if "lora_" not in n]


def _adapter_parameters(folder: Path) -> int:
    """Weights stored in the adapter file: what the run trained."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open has keys(), not iteration)
            total += math.prod(f.get_slice(key).get_shape())
    return total


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
