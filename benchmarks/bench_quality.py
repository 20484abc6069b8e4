"""Training quality against the reference tools: lorakit beside transformers.Trainer (full
fine-tuning) and Trainer + peft (LoRA), on the same task and settings, scored by the same code.

Every run starts from the built-in model (SmolLM2-135M-Instruct, fp32) and trains on the same
tokenized samples (lorakit's pipeline: chat template, loss on the answer only): `--steps`
optimizer steps of `--batch` samples, AdamW (betas 0.9/0.999, eps 1e-8, no weight decay),
`--warmup` warmup steps then cosine to 0, gradient clipping at 1.0, seed 0. Each tool draws its
own batch order (its default: lorakit's seeded shuffle, Trainer's RandomSampler). LoRA: r=16,
alpha=32, no dropout, on all seven projections (q, k, v, o, gate, up, down); a LoRA model is
merged before it is scored. Scoring, identical for every model: the answer loss on the task's
held-out split (`lorakit.train.evaluate.eval_loss`) and exact match of greedy answers
(`lorakit.jobs.evaluation.score_answers`).

    python benchmarks/bench_quality.py                          # arithmetic, all four runs
    python benchmarks/bench_quality.py --task identity --steps 24
    python benchmarks/bench_quality.py --runs lorakit-full,lorakit-full-grouped --json out.json

Runs: trainer-full, lorakit-full, peft-lora, lorakit-lora; `lorakit-full-grouped` and
`lorakit-lora-grouped` train lorakit with `data.group_by_length=true` (length-sorted batches).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TASKS = {  # max_length, new tokens for exact match
    "arithmetic": (96, 8),
    "identity": (128, 24),
}
RUNS = ["trainer-full", "lorakit-full", "peft-lora", "lorakit-lora"]


def load(task: str, grouped: bool = False):
    """The built-in model (fp32), its tokenizer, the train set and the held-out DataConfig."""
    from lorakit.data.pipeline import DataConfig, build_dataset
    from lorakit.models import BUILTIN_MODEL, load_model, load_tokenizer

    max_length, _ = TASKS[task]
    tokenizer = load_tokenizer(BUILTIN_MODEL)
    model = load_model(BUILTIN_MODEL, dtype="float32")
    data = DataConfig(dataset=task, max_length=max_length, group_by_length=grouped)
    test = data.model_copy(update={"split": "test", "group_by_length": False})
    return model, tokenizer, build_dataset(data, tokenizer), test


def score(model, tokenizer, test, task: str) -> dict[str, float]:
    """Held-out answer loss and exact match, the same code for every model."""
    import torch

    from lorakit.data.pipeline import build_dataset
    from lorakit.jobs.evaluation import score_answers
    from lorakit.train.config import TrainConfig
    from lorakit.train.evaluate import eval_loss
    from lorakit.train.plan import eval_batches

    model.eval()
    batches = eval_batches(build_dataset(test, tokenizer), 8)
    loss = eval_loss(model, batches, "cpu", TrainConfig(precision="fp32"))["eval_loss"]
    cpu = torch.device("cpu")
    answers = score_answers(model, tokenizer, test, TASKS[task][1], cpu, precision="fp32")
    return {"eval_loss": loss, "exact_match": answers["exact_match"]}


def lorakit_run(model, tokenizer, train_set, args, lora: bool, out: Path):
    """lorakit's loop (library API) on the train set; returns the model to score."""
    from lorakit.lora.config import LoraConfig
    from lorakit.lora.model import get_peft_model
    from lorakit.train.config import TrainConfig
    from lorakit.train.loop import train
    from lorakit.train.runtime import seed_everything

    if lora:
        seed_everything(0)
        config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)
        model = get_peft_model(model, config)
    else:
        model.requires_grad_(True)
    config = TrainConfig(
        max_steps=args.steps,
        batch_size=args.batch,
        lr=args.lr_lora if lora else args.lr_full,
        warmup_steps=args.warmup,
        scheduler="cosine",
        max_grad_norm=1.0,
        precision="fp32",
        seed=0,
        progress="none",
        tensorboard=False,
        plots=False,
        keep_checkpoints=1,
    )
    train(model, tokenizer, train_set, None, config, out)
    return model.merge_and_unload() if lora else model


class _Collator:
    """Pads a list of samples into a batch (input ids with pad, labels with -100)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows):
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def trainer_run(model, tokenizer, train_set, args, lora: bool, out: Path):
    """transformers.Trainer (and peft for LoRA) on the same samples; the model to score."""
    from transformers import Trainer, TrainingArguments, set_seed

    set_seed(0)
    if lora:
        import peft

        config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)
        model = peft.get_peft_model(model, config)
    rows = [{"input_ids": s.input_ids, "labels": s.labels} for s in train_set.samples]
    training = TrainingArguments(
        output_dir=str(out),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr_lora if lora else args.lr_full,
        warmup_steps=args.warmup,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=0,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=max(1, args.steps // 4),
        remove_unused_columns=False,
        dataloader_drop_last=True,
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    Trainer(model=model, args=training, train_dataset=rows, data_collator=_Collator(pad)).train()
    return model.merge_and_unload() if lora else model


def run_one(name: str, args) -> dict:
    """Train one run from a fresh model and score it."""
    grouped = name.endswith("-grouped")
    model, tokenizer, train_set, test = load(args.task, grouped)
    lora = name.split("-")[1] == "lora"  # trainer-full, peft-lora, lorakit-lora-grouped
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as out:
        if name.startswith("lorakit"):
            model = lorakit_run(model, tokenizer, train_set, args, lora, Path(out) / "run")
        else:
            model = trainer_run(model, tokenizer, train_set, args, lora, Path(out) / "run")
    seconds = time.perf_counter() - start
    lr = args.lr_lora if lora else args.lr_full
    return {"run": name, "lr": lr, "train_s": seconds, **score(model, tokenizer, test, args.task)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=sorted(TASKS), default="arithmetic")
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated run names")
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--lr-full", type=float, default=1e-4)
    p.add_argument("--lr-lora", type=float, default=1e-3)
    p.add_argument("--no-base", action="store_true", help="skip scoring the untrained model")
    p.add_argument("--json", type=Path, help="append each result as a JSON line to this file")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    names = [n for n in args.runs.split(",") if n]
    known = {*RUNS, "lorakit-full-grouped", "lorakit-lora-grouped"}
    for name in names:
        if name not in known:
            raise SystemExit(f"unknown run {name!r}; runs: {', '.join(sorted(known))}")
    results = []
    if not args.no_base:
        model, tokenizer, _, test = load(args.task)
        results.append({"run": "base", "lr": None, "train_s": 0.0})
        results[-1].update(score(model, tokenizer, test, args.task))
        _emit(results[-1], args)
    for name in names:
        results.append(run_one(name, args))
        _emit(results[-1], args)
    print(f"\n{args.task}: {args.steps} steps x batch {args.batch}, fp32, seed 0")
    print(f"{'run':<22}{'lr':>9}{'held-out loss':>15}{'exact match':>13}{'train s':>9}")
    for r in results:
        lr = f"{r['lr']:.0e}" if r["lr"] else "-"
        print(
            f"{r['run']:<22}{lr:>9}{r['eval_loss']:>15.3f}"
            f"{r['exact_match']:>13.0%}{r['train_s']:>9.0f}"
        )


def _emit(result: dict, args) -> None:
    print(json.dumps({"task": args.task, "steps": args.steps, **result}), flush=True)
    if args.json:
        with open(args.json, "a", encoding="utf-8") as f:
            f.write(json.dumps({"task": args.task, "steps": args.steps, **result}) + "\n")


if __name__ == "__main__":
    main()
