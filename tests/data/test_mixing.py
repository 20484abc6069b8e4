"""data.datasets: several sources (files and built-ins, each with its own format and columns)
mixed by weight or row count, shuffled with the seed, and named in errors and by inspect."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from pydantic import ValidationError

from lorakit.data.mixing import DatasetSource, take
from lorakit.data.pipeline import DataConfig, load_conversations
from lorakit.errors import DataError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def own(tmp_path):
    """30 rows of a user's file in its own column names (question / answer)."""
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(30)]
    return write_jsonl(tmp_path / "own.jsonl", rows)


def origins(rows):
    return Counter(row.where.split(" ")[0] for row, _ in rows)


def test_a_file_with_its_own_columns_mixes_with_a_builtin(own):
    mapping = {"prompt": "question", "completion": "answer"}
    config = DataConfig(
        datasets=[
            {"path": own, "format": "prompt_completion", "columns": mapping},
            {"path": "general"},
        ]
    )
    name, rows = load_conversations(config)
    general = load_conversations(DataConfig(dataset="general"))[1]
    assert name == "mix of own.jsonl + general_train.jsonl"
    assert origins(rows) == {"own.jsonl": 30, "general_train.jsonl": len(general)}
    first_own = next(c for row, c in rows if row.where == "own.jsonl line 1")
    assert first_own == [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "a0"}]
    # shuffled: the two sources interleave (not 30 own rows, then general's)
    firsts = [row.where.startswith("own") for row, _ in rows[:30]]
    assert 0 < sum(firsts) < 30


def test_weights_and_row_counts(own):
    config = DataConfig(
        datasets=[{"path": own, "weight": 2}],
        columns={"prompt": "question", "completion": "answer"},  # entries inherit data's keys
    )
    _, doubled = load_conversations(config)
    assert len(doubled) == 60 and Counter(r.where for r, _ in doubled).most_common(1)[0][1] == 2
    _, half = load_conversations(
        DataConfig(
            datasets=[{"path": own, "weight": 0.5}, {"path": "identity", "rows": 7}],
            columns={"prompt": "question", "completion": "answer"},
        )
    )
    assert origins(half) == {"own.jsonl": 15, "identity_train.jsonl": 7}
    assert len({r.where for r, _ in half}) == 22  # drawn without replacement


def test_the_seed_decides_the_draw_and_the_order(own):
    def mixed(seed):
        config = DataConfig(
            datasets=[{"path": own, "weight": 0.5}, {"path": "general", "rows": 10}],
            columns={"prompt": "question", "completion": "answer"},
            mix_seed=seed,
        )
        return [row.where for row, _ in load_conversations(config)[1]]

    assert mixed(0) == mixed(0)
    assert mixed(0) != mixed(1) and sorted(mixed(0)) != sorted(mixed(1))


def test_take_repeats_whole_copies_then_draws_the_rest():
    items = list(range(5))
    assert take(items, 12, random.Random(0))[:10] == items + items
    rest = take(items, 12, random.Random(0))[10:]
    assert len(set(rest)) == 2 and rest == sorted(rest)
    assert take(items, 5, random.Random(0)) == items


def test_limit_takes_the_first_rows_of_the_shuffled_mix(own):
    config = DataConfig(
        datasets=[{"path": own}, {"path": "identity"}],
        columns={"prompt": "question", "completion": "answer"},
        limit=20,
    )
    _, rows = load_conversations(config)
    assert len(rows) == 20 and len(origins(rows)) == 2


def test_errors_name_the_entry_and_the_conflicting_keys(own, tmp_path):
    with pytest.raises(DataError, match=r"data.datasets entry 2 \('missing.jsonl'\).*not exist"):
        load_conversations(DataConfig(datasets=[{"path": "general"}, {"path": "missing.jsonl"}]))
    with pytest.raises(ValidationError, match="sets both weight and rows"):
        DatasetSource(path=own, weight=2, rows=3)
    with pytest.raises(ValidationError, match="both `dataset` .* and `datasets`"):
        DataConfig(dataset=own, datasets=[{"path": "general"}])
    resolved = DataConfig(datasets=[{"path": "general"}]).model_dump(mode="json")
    assert DataConfig.model_validate(resolved).datasets[0].path == "general"  # config.yaml reads
    with pytest.raises(DataError, match="gives the mix no row"):
        load_conversations(DataConfig(datasets=[{"path": "identity", "weight": 0.001}]))


def test_inspect_lists_each_source_of_the_mix(own):
    from builtin_model import builtin_tokenizer
    from lorakit.data.pipeline import inspect_dataset

    config = DataConfig(
        datasets=[{"path": own, "weight": 2}, {"path": "identity", "rows": 5}],
        columns={"prompt": "question", "completion": "answer"},
    )
    text = inspect_dataset(config, builtin_tokenizer(), n=1)
    assert "mix of own.jsonl + identity_train.jsonl: 65 of 65 rows used" in text
    assert "mixed from:\n  own.jsonl: 60 rows of 30\n  identity_train.jsonl: 5 rows of" in text
