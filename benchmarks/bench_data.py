"""Data pipeline: built-in model load times, tokenization throughput, padding share.

- load: converting the built-in GGUF model into a fresh cache folder (first use), then loading
  model + tokenizer from the cache (later uses);
- tokens/s: `lorakit.data.build_dataset` (formats, prefix-by-prefix rendering, response masks)
  against the bare reference `tokenizer.apply_chat_template(messages, tokenize=True)` (no masks)
  on the same conversations;
- padding share of the batches (batch 8): random order, length-grouped, packed.

Usage: python benchmarks/bench_data.py [--convert] [--repeats 3] [--max-length 512]

`--sizes 10000,100000 [--train both]`: generated chat datasets of those many conversations through
the token store against `datasets.map` + `apply_chat_template` (benchmarks/data_scale.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import data_scale  # benchmarks/data_scale.py: the --sizes mode

from lorakit.data.batches import padding_share
from lorakit.data.builtin import make_arithmetic_rows
from lorakit.data.pipeline import DataConfig, build_dataset, load_conversations, make_batches
from lorakit.models import ensure_builtin_model, load_model, load_tokenizer


def load_times(convert: bool) -> None:
    """First (conversion) and cached load times of the built-in model."""
    if convert:
        with tempfile.TemporaryDirectory() as home:
            os.environ["LORAKIT_HOME"] = home
            start = time.perf_counter()
            ensure_builtin_model()
            print(
                "first use (GGUF -> cached safetensors folder): "
                f"{time.perf_counter() - start:.1f} s"
            )
            del os.environ["LORAKIT_HOME"]
    ensure_builtin_model()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        load_model("smollm2-135m-instruct")
        load_tokenizer("smollm2-135m-instruct")
        times.append(time.perf_counter() - start)
    print(f"cached load (model + tokenizer), median of 3: {statistics.median(times):.2f} s")


def multi_turn_file(folder: Path, rows: int = 300) -> str:
    """A sharegpt file of 1-4 turn conversations built from arithmetic questions."""
    questions = make_arithmetic_rows(rows * 4, seed=7)
    path = folder / "multi_turn.jsonl"
    with path.open("w") as out:
        for i in range(rows):
            turns = []
            for q in questions[4 * i : 4 * i + 1 + i % 4]:
                turns += [
                    {"from": "human", "value": q["prompt"]},
                    {"from": "gpt", "value": f"The answer is {q['completion']}."},
                ]
            out.write(json.dumps({"conversations": turns}) + "\n")
    return str(path)


def throughput(tokenizer, config: DataConfig, repeats: int) -> tuple[float, float, object]:
    """(lorakit tokens/s, reference tokens/s, dataset), medians over repeats."""
    ours, theirs, dataset = [], [], None
    for _ in range(repeats):
        start = time.perf_counter()
        dataset = build_dataset(config.model_copy(update={"cache": False}), tokenizer)
        ours.append(sum(dataset.lengths()) / (time.perf_counter() - start))
        _, conversations = load_conversations(config)
        start = time.perf_counter()
        count = sum(
            len(tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"])
            for _, c in conversations
        )
        theirs.append(count / (time.perf_counter() - start))
    return statistics.median(ours), statistics.median(theirs), dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--convert", action="store_true", help="also time a fresh conversion")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sizes", help="comma-separated conversation counts (data_scale.py)")
    parser.add_argument(
        "--train",
        choices=["none", "cached", "both"],
        default="none",
        help="with --sizes: time `lorakit train` to its first step (first run and/or cached)",
    )
    args = parser.parse_args()
    if args.sizes:
        data_scale.run_sizes([int(n) for n in args.sizes.split(",")], args.train)
        return
    load_times(args.convert)
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    with tempfile.TemporaryDirectory() as folder:
        sources = {
            "identity": "identity",
            "arithmetic": "arithmetic",
            "multi-turn sharegpt": multi_turn_file(Path(folder)),
        }
        print(
            "| dataset | samples | tokens | lorakit tok/s | reference tok/s "
            "| random | grouped | packed |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for name, source in sources.items():
            config = DataConfig(dataset=source, max_length=args.max_length)
            ours, theirs, dataset = throughput(tokenizer, config, args.repeats)
            lengths = dataset.lengths()
            shares = [
                padding_share(dataset.samples, make_batches(lengths, args.batch, **kw))
                for kw in (
                    {"group_by_length": False},
                    {},
                    {"packing": True, "max_length": args.max_length},
                )
            ]
            cells = " | ".join(f"{s:.1%}" for s in shares)
            print(
                f"| {name} | {len(dataset)} | {sum(lengths)} "
                f"| {ours:,.0f} | {theirs:,.0f} | {cells} |"
            )


if __name__ == "__main__":
    main()
