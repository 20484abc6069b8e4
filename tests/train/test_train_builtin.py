"""End to end on the built-in SmolLM2-135M-Instruct with lorakit's own data pipeline (slow)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_builtin_model_trains_on_a_tokenized_dataset(tmp_path):
    from lorakit import LoraConfig, get_peft_model
    from lorakit.data.pipeline import DataConfig, build_dataset
    from lorakit.models import load_model, load_tokenizer
    from lorakit.train import TrainConfig, train

    tokenizer = load_tokenizer()
    data = build_dataset(DataConfig(dataset="identity", limit=4, max_length=128), tokenizer)
    model = get_peft_model(
        load_model(), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    config = TrainConfig(
        batch_size=2,
        max_steps=2,
        lr=1e-3,
        precision="fp32",
        eval_max_batches=1,
        eval_prompts=["Who are you?"],
        eval_max_new_tokens=8,
        progress="none",
        tensorboard=False,
    )
    result = train(model, tokenizer, data, data, config, tmp_path)
    assert result.steps == 2 and all(loss > 0 for loss in result.losses)
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()
    sample = json.loads((tmp_path / "samples.jsonl").read_text().splitlines()[-1])  # after step 0
    assert sample["prompt"] == "Who are you?" and sample["step"] == 2
