"""Several adapters on one base: train two identities, load both, switch, combine with weights,
and generate with each (also in one mixed batch, one adapter per row).

    python examples/05_multi_adapter.py [--tiny] [--model DIR_OR_ALIAS]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from lorakit import LoraConfig, LoraModel, get_peft_model
from lorakit.data.batches import model_inputs
from lorakit.data.pipeline import DataConfig, build_dataset, collate_batch, plan_epoch
from lorakit.models import BUILTIN_MODEL, chat_template_of, load_model, load_tokenizer

NAMES = {"lumi": "Lumi", "nova": "Nova"}


def train_identity(model_name: str, tokenizer, name: str, steps: int, out: Path) -> Path:
    """A LoRA adapter that answers 'I am <name>', trained with a plain loop; saved to `out`."""
    data = build_dataset(
        DataConfig(
            dataset="identity",
            max_length=256,
            packing=True,
            template_vars={"name": name, "author": "lorakit"},
        ),
        tokenizer,
    )
    lora = get_peft_model(
        load_model(model_name), LoraConfig(r=8, lora_alpha=16, target_modules="preset")
    )
    lora.chat_template = chat_template_of(tokenizer)
    params = [p for p in lora.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-3)
    plan = plan_epoch(data, 4, seed=0)
    lora.train()
    for step in range(steps):
        batch = model_inputs(collate_batch(data, plan[step % len(plan)]))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = lora(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    print(f"adapter `{name}`: last loss {loss.item():.3f}")
    lora.save_pretrained(out)
    return out


@torch.no_grad()
def prompt_ids(tokenizer, template: str, question: str) -> torch.Tensor:
    """Chat-formatted prompt ids (1, T)."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        chat_template=template,
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]


@torch.no_grad()
def reply(model, tokenizer, ids: torch.Tensor, new_tokens: int, **kwargs) -> list[str]:
    """Greedy continuations of a (left-padded) batch of prompts."""
    mask = (ids != tokenizer.pad_token_id).long()
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )
    return [tokenizer.decode(row[ids.shape[1] :], skip_special_tokens=True).strip() for row in out]


def main() -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", default=bool(os.environ.get("TINY")))
    parser.add_argument("--model", default=BUILTIN_MODEL)
    args = parser.parse_args()
    steps, new_tokens = (1, 3) if args.tiny else (30, 20)
    tokenizer = load_tokenizer(args.model)

    with tempfile.TemporaryDirectory() as folder:
        paths = {
            key: train_identity(args.model, tokenizer, name, steps, Path(folder) / key)
            for key, name in NAMES.items()
        }
        model = LoraModel.from_pretrained(load_model(args.model), paths["lumi"], "lumi")
        model.load_adapter(paths["nova"], "nova")
    template = model.chat_template or chat_template_of(tokenizer)
    ids = prompt_ids(tokenizer, template, "What is your name?")
    answers = {}
    for name in ("lumi", "nova"):
        model.set_adapter(name)
        answers[name] = reply(model, tokenizer, ids, new_tokens)[0]
    with model.disable_adapter():
        answers["base"] = reply(model, tokenizer, ids, new_tokens)[0]
    model.add_weighted_adapter(["lumi", "nova"], [0.5, 0.5], "half-half", combination_type="cat")
    model.set_adapter("half-half")
    answers["half-half"] = reply(model, tokenizer, ids, new_tokens)[0]
    for name, text in answers.items():
        print(f"{name:>10}: {text}")

    batch = torch.cat([ids, ids, ids])  # one prompt per row, a different adapter per row
    mixed = reply(model, tokenizer, batch, new_tokens, adapter_names=["lumi", "nova", "__base__"])
    same = mixed == [answers["lumi"], answers["nova"], answers["base"]]
    print(f"mixed batch (lumi, nova, base): {mixed}\nsame as one at a time: {same}")
    return {**answers, "mixed_matches": same}


if __name__ == "__main__":
    main()
