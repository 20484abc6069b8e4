"""Identity fine-tuning of an instruct model with the Hugging Face `Trainer`.

The lorakit-wrapped model goes into `transformers.Trainer` unchanged, with default
`TrainingArguments` columns handling; every `checkpoint-N` holds the adapter in peft's format
(as it would with peft). Afterwards the adapter of the last checkpoint is loaded onto a fresh copy
of the base model and asked who it is.

    python examples/04_hf_trainer_identity.py [--tiny] [--model DIR_OR_ALIAS] [--output DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from lorakit import LoraConfig, LoraModel, get_peft_model
from lorakit.data.pipeline import IGNORE_INDEX, DataConfig, build_dataset
from lorakit.models import BUILTIN_MODEL, chat_template_of, load_model, load_tokenizer


def pad_collator(pad_id: int):
    """Pad input_ids with the pad token and labels with -100 to the longest row."""

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_id)
        labels = torch.full((len(rows), width), IGNORE_INDEX)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n], labels[i, :n] = torch.tensor(row["input_ids"]), torch.tensor(row["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate


@torch.no_grad()
def ask(model, tokenizer, question: str, max_new_tokens: int) -> str:
    """Greedy answer to one user question, with the adapter's chat template."""
    template = getattr(model, "chat_template", None) or chat_template_of(tokenizer)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        chat_template=template,
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def main() -> dict[str, str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", default=bool(os.environ.get("TINY")))
    parser.add_argument("--model", default=BUILTIN_MODEL)
    parser.add_argument("--output", default=None, help="Trainer output dir (default: a temp dir)")
    args = parser.parse_args()
    steps, new_tokens = (3, 4) if args.tiny else (40, 24)

    tokenizer = load_tokenizer(args.model)
    data = build_dataset(DataConfig(dataset="identity", max_length=256), tokenizer)
    rows = [{"input_ids": s.input_ids, "labels": s.labels} for s in data.samples]
    model = get_peft_model(
        load_model(args.model), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    )
    model.chat_template = chat_template_of(tokenizer)

    output = Path(args.output or tempfile.mkdtemp(prefix="lorakit-trainer-"))
    training = TrainingArguments(
        output_dir=str(output),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        warmup_steps=max(1, steps // 10),
        lr_scheduler_type="cosine",
        logging_steps=max(1, steps // 5),
        save_steps=max(1, steps // 2),
        save_total_limit=2,
        report_to="none",
        use_cpu=True,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=rows,
        data_collator=pad_collator(tokenizer.pad_token_id),
    )
    trainer.train()

    adapter = output / f"checkpoint-{steps}"
    fresh = LoraModel.from_pretrained(load_model(args.model), adapter)  # a fresh base
    question = "Who are you?"
    reply = ask(fresh, tokenizer, question, new_tokens)
    print(f"adapter from {adapter}\nQ: {question}\nA: {reply}")
    return {"adapter": str(adapter), "reply": reply}


if __name__ == "__main__":
    main()
