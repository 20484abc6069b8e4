"""docs/configuration.md: generated from the config classes, and up to date."""

from __future__ import annotations

from pathlib import Path

from lorakit.jobs.config_reference import config_reference
from lorakit.jobs.run_config import RunConfig

DOCS = Path(__file__).parents[2] / "docs" / "configuration.md"


def test_reference_lists_every_key_and_is_up_to_date():
    text = config_reference()
    for section, model in RunConfig.model_fields.items():
        assert section in text
        annotation = model.annotation
        for key in getattr(annotation, "model_fields", {}):
            assert f"| `{key}` |" in text, (section, key)
    assert DOCS.read_text(encoding="utf-8") == text, (
        "docs/configuration.md is out of date; regenerate it with: python -c 'import "
        'lorakit.jobs.config_reference as s; print(s.config_reference(), end="")\' '
        "> docs/configuration.md"
    )
