"""The token store and its cache: the same tokens, labels, bad-row reports and batch plans as
the in-memory pipeline (rebuilt here row by row from its parts); the cache key; atomic writes;
reuse by a second run and by every variant of a sweep; `list_caches` / `clear_caches`."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from builtin_model import builtin_tokenizer
from lorakit.data import parallel
from lorakit.data.batches import collate
from lorakit.data.formats import RowProblem
from lorakit.data.pipeline import (
    DataConfig,
    Sample,
    TokenizedDataset,
    build_dataset,
    load_conversations,
    plan_epoch,
    prompt_template,
)
from lorakit.data.store import (
    MARKER,
    ConcatSamples,
    StoreSamples,
    cache_root,
    clear_caches,
    list_caches,
)
from lorakit.data.tokenize import (
    encode_conversation,
    encode_text,
    finish_labels,
    supervised_count,
    truncate,
)
from lorakit.errors import DataError


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache of this test's own."""
    monkeypatch.setenv("LORAKIT_DATA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def in_memory(config: DataConfig, tok) -> TokenizedDataset:
    """The pipeline as it was before the store: every row read, converted and tokenized here,
    the samples kept as Python lists."""
    source, conversations = load_conversations(config)
    template = prompt_template(config, tok)
    samples, problems, truncated = [], [], 0
    for row, conversation in conversations:
        try:
            if isinstance(conversation, RowProblem):
                raise conversation
            if isinstance(conversation, str):
                ids, labels = encode_text(tok, conversation)
            else:
                ids, labels = encode_conversation(tok, template, conversation, config.train_on)
        except RowProblem as problem:
            problems.append(f"{row.where}: {problem}")
            continue
        ids, labels, cut = truncate(ids, labels, config.max_length, config.truncation)
        labels = finish_labels(labels)
        if supervised_count(labels) == 0:
            why = f" after truncation to max_length={config.max_length}" if cut else ""
            problems.append(f"{row.where}: no token is left to train on{why}")
            continue
        truncated += cut
        samples.append(Sample(ids, labels, row.where))
    raw = any(isinstance(c, str) for _, c in conversations)
    return TokenizedDataset(
        samples, config, source, tok.pad_token_id, len(conversations), problems, truncated, raw
    )


def assert_same(store: TokenizedDataset, reference: TokenizedDataset) -> None:
    """Samples, report and batch plans (unpacked, grouped, packed; 2 ranks) all equal."""
    assert isinstance(store.samples, StoreSamples)
    assert [dataclass_tuple(s) for s in store.samples] == [
        dataclass_tuple(s) for s in reference.samples
    ]
    for field in ("source", "rows_total", "skipped", "truncated", "raw_text", "pad_token_id"):
        assert getattr(store, field) == getattr(reference, field), field
    assert store.lengths() == reference.lengths()
    assert store.supervised_tokens() == reference.supervised_tokens()
    assert store.summary() == reference.summary()
    for packing, grouped in ((False, False), (False, True), (True, False)):
        cfg = store.config.model_copy(update={"packing": packing, "group_by_length": grouped})
        for rank in (0, 1):
            a = plan_epoch(_with(store, cfg), 3, seed=5, epoch=1, rank=rank, world_size=2)
            b = plan_epoch(_with(reference, cfg), 3, seed=5, epoch=1, rank=rank, world_size=2)
            assert a == b
        if a:
            x = collate(store.samples, a[0], store.pad_token_id, packing)
            y = collate(reference.samples, a[0], reference.pad_token_id, packing)
            for key in ("input_ids", "labels", "position_ids"):
                assert torch.equal(x[key], y[key])


def dataclass_tuple(sample: Sample) -> tuple:
    return (sample.input_ids, sample.labels, sample.where)


def _with(data: TokenizedDataset, config: DataConfig) -> TokenizedDataset:
    import dataclasses

    return dataclasses.replace(data, config=config)


@pytest.mark.parametrize("name", ["identity", "general", "arithmetic"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_builtin_datasets_match_the_in_memory_pipeline(tok, cache, name, split):
    config = DataConfig(dataset=name, split=split, max_length=256, limit=120)
    assert_same(build_dataset(config, tok), in_memory(config, tok))


def fixture_rows() -> list:
    """prompt / completion rows: Chinese text, a long one, and bad ones of each kind."""
    return [
        {"prompt": "Capital of France?", "completion": "Paris."},
        {"prompt": "你好?", "completion": "好"},
        {"prompt": "long " * 300, "completion": "end " * 20},
        '{"prompt": "q", "completion": ',
        {"prompt": "q"},
        [1, 2],
        {"prompt": "q", "completion": 5},
        {"prompt": "q " * 80, "completion": "a"},
    ] * 3


def good_rows(n: int) -> list:
    return [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(n)]


OTHER_FORMATS = [
    [{"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be short."}],
    [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}],
    [
        {
            "messages": [
                {"role": "user", "content": "你好?"},
                {"role": "assistant", "content": "好"},
            ]
        },
        {"messages": [{"role": "user", "content": "q"}]},
    ],
    [{"text": "plain text one"}, {"text": "two"}],
]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"truncation": "left", "train_on": "all"},
        {"template": "plain", "system_prompt": "You are terse."},
    ],
)
def test_fixture_rows_match_in_one_process_and_in_two(tok, cache, tmp_path, settings):
    path = write_jsonl(tmp_path / "d.jsonl", fixture_rows())
    config = DataConfig(
        dataset=path, max_length=64, bad_rows="skip", max_skipped_share=0.9, **settings
    )
    reference = in_memory(config, tok)
    assert len(reference.skipped) >= 12 and len(reference) >= 6  # the fixture does test
    assert reference.truncated == (6 if settings.get("truncation") == "left" else 0)
    assert_same(build_dataset(config.model_copy(update={"num_proc": 1}), tok), reference)
    # more rows than one chunk per worker, so that two workers really share them
    many = write_jsonl(tmp_path / "many.jsonl", fixture_rows() * 40)
    config = config.model_copy(update={"dataset": many, "num_proc": 2})
    assert_same(build_dataset(config, tok), in_memory(config, tok))


def test_text_csv_parquet_and_json_files_match(tok, cache, tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"prompt": ["a?", "b?", ""], "completion": ["A", "B", "C"]})
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(frame.to_dict("records")))
    names = ["d.csv", "d.parquet", "d.json"]
    for i, rows in enumerate(OTHER_FORMATS):
        names.append(f"f{i}.jsonl")
        write_jsonl(tmp_path / names[-1], rows)
    for name in names:
        config = DataConfig(dataset=str(tmp_path / name), bad_rows="skip", max_skipped_share=0.5)
        assert_same(build_dataset(config, tok), in_memory(config, tok))


def test_the_bad_row_report_is_the_same_from_the_cache(tok, cache, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", fixture_rows())
    config = DataConfig(dataset=path, max_length=64)
    for _ in range(2):  # tokenized, then read from the cache: the same refusal
        with pytest.raises(DataError, match=r"d.jsonl: 18 of 24 rows cannot be used") as err:
            build_dataset(config, tok)
        assert "d.jsonl line 4: invalid JSON" in str(err.value)
    assert len(list_caches()) == 1


@pytest.fixture
def counted(monkeypatch):
    """How many conversations are tokenized (in this process: num_proc=1)."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return encode_conversation(*args, **kwargs)

    monkeypatch.setattr(parallel, "encode_conversation", counting)
    return calls


def test_cache_hits_and_misses(tok, cache, tmp_path, counted):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, good_rows(5))
    base = DataConfig(dataset=str(path), max_length=256, num_proc=1)
    first = build_dataset(base, tok)
    assert len(counted) == 5
    # batching, bad-row policy and process count do not change the tokens: hits
    for update in ({"packing": True}, {"group_by_length": False}, {"bad_rows": "skip"}):
        again = build_dataset(base.model_copy(update=update), tok)
        assert again.samples.folder == first.samples.folder
    assert len(counted) == 5
    # what changes the tokens misses: max length, template, train_on, variables, system prompt
    for update in (
        {"max_length": 128},
        {"template": "plain"},
        {"train_on": "all"},
        {"template_vars": {"x": "y"}},
        {"system_prompt": "Hi."},
        {"limit": 4},
    ):
        build_dataset(base.model_copy(update=update), tok)
    assert len(counted) == 5 + 5 * 5 + 4
    write_jsonl(path, good_rows(4) + [{"prompt": "new", "completion": "row"}])
    changed = build_dataset(base, tok)  # the same path, other contents
    assert len(counted) == 5 + 5 * 5 + 4 + 5
    assert changed.samples[4].where == "d.jsonl line 5" and changed.samples.folder != (
        first.samples.folder
    )
    assert len(list_caches()) == 8


def test_another_tokenizer_or_chat_template_misses(tok, cache, tmp_path, counted):
    path = write_jsonl(tmp_path / "d.jsonl", good_rows(4))
    config = DataConfig(dataset=path, num_proc=1)
    build_dataset(config, tok)
    other = builtin_tokenizer()
    other.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    build_dataset(config, other)
    other.add_tokens(["zzzyyy"])
    build_dataset(config, other)
    assert len(counted) == 12


def test_no_cache_leaves_nothing_behind(tok, cache, tmp_path, counted):
    path = write_jsonl(tmp_path / "d.jsonl", good_rows(4))
    config = DataConfig(dataset=path, num_proc=1, cache=False)
    data = build_dataset(config, tok)
    folder = data.samples.folder
    assert folder.is_dir() and not cache.exists()
    del data
    import gc

    gc.collect()
    assert not folder.exists()


def test_a_killed_writer_leaves_no_store_and_an_unmarked_one_is_rebuilt(
    tok, cache, tmp_path, counted, monkeypatch
):
    path = write_jsonl(tmp_path / "d.jsonl", good_rows(4))
    config = DataConfig(dataset=path, num_proc=1)

    def killed(job, rows):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(parallel, "encode_chunk", killed)
        with pytest.raises(KeyboardInterrupt):
            build_dataset(config, tok)
    assert [p.name for p in cache.iterdir()] == ["digests"]  # no staging folder, no store
    data = build_dataset(config, tok)
    folder = data.samples.folder
    (folder / MARKER).unlink()  # as if written by a crashed writer of an older kind
    assert len(counted) == 4
    assert [e.complete for e in list_caches()] == [False]
    again = build_dataset(config, tok)
    assert len(counted) == 8 and again.samples.folder == folder and (folder / MARKER).is_file()


def test_list_and_clear(tok, cache, tmp_path):
    for n in (2, 3):
        build_dataset(
            DataConfig(dataset=write_jsonl(tmp_path / f"{n}.jsonl", fixture_rows()[:n])), tok
        )
    entries = list_caches()
    assert [(e.source, e.samples, e.complete) for e in entries] == [
        ("3.jsonl", 3, True),
        ("2.jsonl", 2, True),
    ]
    assert all(e.tokens > 0 and e.bytes > e.tokens * 4 for e in entries)
    with pytest.raises(DataError, match="no cached store nope"):
        clear_caches(["nope"])
    assert clear_caches([entries[0].key]) == [entries[0].key]
    assert [e.source for e in list_caches()] == ["2.jsonl"]
    assert clear_caches() == [entries[1].key] and list_caches() == []
    assert cache_root() == cache


def test_progress_lines_say_rows_rate_and_time_left(tok, cache, tmp_path, monkeypatch):
    monkeypatch.setattr(parallel, "_PROGRESS_EVERY", 0.0)
    path = write_jsonl(tmp_path / "d.jsonl", good_rows(600))
    lines = []
    build_dataset(DataConfig(dataset=path, num_proc=1), tok, progress=lines.append)
    assert lines[0].startswith("tokenizing d.jsonl: 256 of ~600 rows (")
    assert " left)" in lines[0]
    assert lines[-1].startswith("tokenized d.jsonl: 600 rows in ")


def test_a_resumed_run_an_eval_and_a_sweep_variant_tokenize_nothing(tmp_path, cache, counted):
    from lorakit.jobs.finetune import run_training
    from lorakit.jobs.run_config import validate_run_config
    from tiny_folders import save_tiny

    model = save_tiny(tmp_path / "model")

    def run(out, lr=1e-2, steps=2, **data):
        return validate_run_config(
            {
                "output_dir": str(tmp_path / out),
                "model": {"name_or_path": str(model)},
                "lora": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]},
                "data": {"dataset": "identity", "limit": 6, "max_length": 96, **data},
                "eval": {"limit": 2},
                "train": {"max_steps": steps, "batch_size": 2, "lr": lr, "save_every": 1}
                | {"precision": "fp32", "progress": "none", "tensorboard": False, "plots": False},
            }
        )

    quiet = {"show": lambda _: None}
    run_training(run("a"), **quiet)
    assert len(counted) == 6 + 2  # the train rows and the eval rows, once
    step1 = tmp_path / "a" / "checkpoints" / "step-00000001"
    run_training(run("a", num_proc=2), resume=str(step1), **quiet)  # resumed, other num_proc
    run_training(run("b", lr=5e-3), **quiet)  # another variant of a sweep: other train settings
    assert len(counted) == 8
    run_training(run("c", max_length=64), **quiet)  # a changed max length tokenizes again
    assert len(counted) == 16


def test_two_stores_add_up_to_one_sequence_without_copies(tok, cache, tmp_path):
    a = build_dataset(DataConfig(dataset=write_jsonl(tmp_path / "a.jsonl", good_rows(2))), tok)
    b = build_dataset(DataConfig(dataset=write_jsonl(tmp_path / "b.jsonl", good_rows(3))), tok)
    both = a.samples + b.samples  # as the quickstart mixes its two datasets
    assert isinstance(both, ConcatSamples) and len(both) == 5
    every = [*a.samples, *b.samples]
    assert [s.where for s in both] == ["a.jsonl line 1", "a.jsonl line 2"] + [
        f"b.jsonl line {i}" for i in (1, 2, 3)
    ]
    assert [dataclass_tuple(s) for s in both] == [dataclass_tuple(s) for s in every]
    assert dataclass_tuple(both[-1]) == dataclass_tuple(every[-1]) and both[1:3] == every[1:3]
    with pytest.raises(IndexError):
        both[5]
    mixed = list(a.samples) + both  # a plain list in front, parts flattened
    assert len(mixed.parts) == 3 and mixed.lengths() == [
        len(s.input_ids) for s in every[:2] + every
    ]
    data = dataclasses.replace(a, samples=both)
    assert data.lengths() == [len(s.input_ids) for s in every]
    assert data.supervised_tokens() == a.supervised_tokens() + b.supervised_tokens()
    assert mixed.supervised_tokens() == 2 * a.supervised_tokens() + b.supervised_tokens()
    pairs = [(i.tolist(), lab.tolist()) for i, lab in both.iter_arrays()]
    assert pairs == [(s.input_ids, s.labels) for s in every]


def test_iter_arrays_reads_every_sample_in_blocks(tok, cache, tmp_path):
    data = build_dataset(DataConfig(dataset=write_jsonl(tmp_path / "d.jsonl", good_rows(9))), tok)
    pairs = list(data.samples.iter_arrays(block=4))
    assert [(ids.tolist(), labels.tolist()) for ids, labels in pairs] == [
        (s.input_ids, s.labels) for s in data.samples
    ]


def test_a_file_digest_is_remembered_until_the_file_changes(cache, tmp_path, monkeypatch):
    from lorakit.data import store

    path = tmp_path / "d.jsonl"
    write_jsonl(path, good_rows(3))
    reads = []
    real = store.source_digest
    monkeypatch.setattr(store, "source_digest", lambda p: reads.append(p) or real(p))
    first = store.remembered_digest(path)
    assert store.remembered_digest(path) == first and len(reads) == 1
    text = path.read_text()
    path.write_text(text.replace("Answer 2", "Answer 9"))  # same size, maybe the same tick
    assert store.remembered_digest(path) == real(path) != first and len(reads) == 2


def test_a_store_keeps_a_content_digest_that_follows_its_samples(tok, cache, tmp_path):
    from lorakit.train.plan import StepPlan

    def plan(data):
        return StepPlan(data, 2, grad_accum_steps=1, seed=0, shuffle=True)

    path = write_jsonl(tmp_path / "d.jsonl", good_rows(5))
    data = build_dataset(DataConfig(dataset=path, cache=False), tok)
    again = build_dataset(DataConfig(dataset=path, cache=False), tok)
    assert data.samples.folder != again.samples.folder
    digest = data.samples.content_digest()
    assert len(digest) == 64 and again.samples.content_digest() == digest
    assert plan(data).fingerprint() == plan(again).fingerprint()
    # the same tokens with one label masked, or one sample fewer, are other data
    write_jsonl(tmp_path / "d.jsonl", good_rows(4))
    fewer = build_dataset(DataConfig(dataset=path, cache=False), tok)
    prompt_only = build_dataset(DataConfig(dataset=path, cache=False, train_on="all"), tok)
    digests = {digest, fewer.samples.content_digest(), prompt_only.samples.content_digest()}
    assert len(digests) == 3
    assert plan(fewer).fingerprint() != plan(data).fingerprint()
    # the per-sample fingerprint (runs begun before) is another value over the same data
    assert plan(data).fingerprint(per_sample=True) == plan(again).fingerprint(per_sample=True)
    assert plan(data).fingerprint(per_sample=True) != plan(data).fingerprint()
    both = data.samples + again.samples  # a mix of stores has a digest of its parts'
    assert len(both.content_digest()) == 64 and (list(data.samples) + both).content_digest() is None


def test_a_run_begun_before_stores_kept_a_digest_resumes_without_force(tmp_path, cache):
    from lorakit.errors import ConfigError
    from lorakit.jobs.finetune import run_training
    from lorakit.jobs.run_config import validate_run_config
    from tiny_folders import save_tiny

    model = save_tiny(tmp_path / "model")
    config = validate_run_config(
        {
            "output_dir": str(tmp_path / "run"),
            "model": {"name_or_path": str(model)},
            "lora": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]},
            "data": {"dataset": "identity", "limit": 6, "max_length": 96},
            "train": {"max_steps": 2, "batch_size": 2, "save_every": 1, "precision": "fp32"}
            | {"progress": "none", "tensorboard": False, "plots": False},
        }
    )
    quiet = {"show": lambda _: None}
    run_training(config, **quiet)
    step1 = tmp_path / "run" / "checkpoints" / "step-00000001"
    state_file = step1 / "state.json"
    state = json.loads(state_file.read_text())
    store = next(p for p in cache.iterdir() if (p / MARKER).is_file())
    samples = StoreSamples(store)
    import hashlib

    per_sample = hashlib.sha256(b"2")  # the fingerprint such a run saved: every sample hashed
    per_sample.update(b"False/96/False")
    for s in samples:
        per_sample.update(np.asarray(s.input_ids, np.int64).tobytes())
        per_sample.update(np.asarray(s.labels, np.int64).tobytes())
    assert state["settings"]["data"] != per_sample.hexdigest()[:16]
    state["settings"]["data"] = per_sample.hexdigest()[:16]
    state_file.write_text(json.dumps(state))
    run_training(config, resume=str(step1), **quiet)  # no --force needed
    state["settings"]["data"] = "0123456789abcdef"  # other data is still refused
    state_file.write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="other settings: data"):
        run_training(config, resume=str(step1), **quiet)
