"""An adapter trained on raw text (the `text` format) is prompted with plain text: its samples
during training and the template saved with it carry no chat turns."""

from __future__ import annotations

import json

import yaml

from lorakit.cli import main
from lorakit.models import RAW_TEMPLATE
from tiny_folders import save_tiny


def test_a_text_trained_adapter_samples_and_saves_plain_text(tmp_path):
    model_dir = save_tiny(tmp_path / "tiny")
    rows = tmp_path / "quotes.jsonl"
    rows.write_text("".join(json.dumps({"text": f"quote number {i}."}) + "\n" for i in range(8)))
    config = {
        "output_dir": str(tmp_path / "run"),
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 2, "lora_alpha": 4},
        "data": {"dataset": str(rows), "max_length": 32},
        "eval": {"dataset": str(rows), "limit": 2},
        "train": {
            "max_steps": 1,
            "batch_size": 2,
            "eval_prompts": ["quote number"],
            "eval_max_new_tokens": 2,
            "progress": "none",
            "tensorboard": False,
            "plots": False,
        },
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0
    final = tmp_path / "run" / "final"
    assert (final / "chat_template.jinja").read_text() == RAW_TEMPLATE

    from lorakit.models import load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "quote number"}],
        chat_template=RAW_TEMPLATE,
        add_generation_prompt=True,
        tokenize=False,
    )
    assert rendered == "quote number"  # no <|im_start|>user ... turns
    samples = (tmp_path / "run" / "samples.jsonl").read_text().splitlines()
    assert samples and json.loads(samples[0])["prompt"] == "quote number"
