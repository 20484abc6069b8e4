"""End to end: LoRA on the built-in model learns from the built-in `identity` batches."""

from __future__ import annotations

import pytest
import torch

from builtin_model import builtin_tokenizer
from lorakit import LoraConfig, get_peft_model
from lorakit.data.batches import model_inputs
from lorakit.data.pipeline import DataConfig, build_dataset, collate_batch, plan_epoch
from lorakit.models import chat_template_of, load_model


@pytest.mark.slow
def test_lora_on_builtin_model_lowers_identity_loss(tmp_path):
    tokenizer = builtin_tokenizer()
    dataset = build_dataset(DataConfig(max_length=128), tokenizer)  # ~60 tokens a sample
    batches = [collate_batch(dataset, rows) for rows in plan_epoch(dataset, 2, seed=0)[:2]]
    model = load_model("smollm2-135m-instruct")  # its own copy: LoRA wraps the layers in place
    lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="preset"))
    lora.chat_template = chat_template_of(tokenizer)
    params = [p for p in lora.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3)

    def loss_on_batches() -> float:
        with torch.no_grad():
            return sum(lora(**model_inputs(b)).loss.item() for b in batches) / len(batches)

    before = loss_on_batches()
    lora.train()
    for step in range(4):
        loss = lora(**model_inputs(batches[step % 2])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    lora.eval()
    after = loss_on_batches()
    assert before > 1.0 and after < 0.6 * before, (before, after)
    lora.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == chat_template_of(tokenizer)
