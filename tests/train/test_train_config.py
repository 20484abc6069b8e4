"""The training loop's settings (lorakit.train.config.TrainConfig): defaults, bounds, unknown
fields refused, and a description for every field (the generated config reference)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lorakit.train.config import TrainConfig


def test_defaults():
    config = TrainConfig().model_dump()
    assert {k: config[k] for k in ("batch_size", "epochs", "max_steps", "lr", "lora_b_lr")} == {
        "batch_size": 8,
        "epochs": 1,
        "max_steps": None,
        "lr": 2e-4,
        "lora_b_lr": None,
    }
    assert (config["scheduler"], config["precision"], config["optimizer"]) == (
        "cosine",
        "auto",
        "adamw",
    )


@pytest.mark.parametrize(
    "field, value",
    [
        ("batch_size", 0),
        ("lr", 0.0),
        ("warmup_ratio", 1.5),
        ("min_lr_ratio", -0.1),
        ("scheduler", "step"),
        ("precision", "fp8"),
        ("keep_checkpoints", 0),
    ],
)
def test_out_of_range_values_are_refused(field, value):
    with pytest.raises(ValidationError, match=field):
        TrainConfig(**{field: value})


def test_unknown_fields_are_refused():
    with pytest.raises(ValidationError, match="learning_rate"):
        TrainConfig(learning_rate=1e-3)


def test_every_field_is_described():
    undescribed = [name for name, f in TrainConfig.model_fields.items() if not f.description]
    assert undescribed == []
