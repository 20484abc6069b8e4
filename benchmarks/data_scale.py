"""bench_data.py --sizes: large generated chat datasets through the token store.

For each size N (conversations) a JSON-lines file of N synthetic 2-turn `messages`
conversations (~300 tokens each) is written, then, each in its own subprocess (peak RSS is the
process's VmHWM; "workers" is the largest child's ru_maxrss):

- lorakit, first run: `build_dataset` (response masks, `num_proc` = cores) into an empty cache;
- lorakit, cached: the same call again (reads the store's index, maps the arrays);
- reference: `datasets.load_dataset("json")` + `Dataset.map` with `apply_chat_template`
  (tokenize=True, no masks, one example per call as TRL's SFT tokenization does),
  `num_proc` = cores, into its own cache folder;
- `lorakit train` to the first optimizer step (a 1-step run of the built-in model, batch 1,
  wall time of the whole command, saving included, and in brackets the time to the line that
  says the dataset is ready), with an empty cache and with the cache
  (`--train both`), or only with the cache the first lorakit measurement filled (`cached`).
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LENGTH = 1024


def synthetic_file(path: Path, n: int, seed: int = 0) -> Path:
    """N 2-turn conversations of made-up words (~300 tokens each with the SmolLM2 tokenizer)."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ren", "to", "sha", "vi", "nor", "el", "pu", "dra", "qui"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(3000)]

    def text(count: int) -> str:
        return " ".join(rng.choices(words, k=count)).capitalize() + "."

    with path.open("w") as out:
        for _ in range(n):
            turns = []
            for _turn in range(2):
                turns += [
                    {"role": "user", "content": text(rng.randint(10, 30))},
                    {"role": "assistant", "content": text(rng.randint(30, 60))},
                ]
            out.write(json.dumps({"messages": turns}) + "\n")
    return path


def _peaks() -> dict[str, float]:
    """Peak RSS in MB of this process and of its largest child."""
    status = Path("/proc/self/status").read_text()
    own = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"rss_mb": own / 1024, "worker_rss_mb": child / 1024}


def worker(kind: str, path: str, folder: str) -> dict[str, float]:
    """One measurement in this (fresh) process."""
    sys.path.insert(0, str(ROOT / "src"))
    from lorakit.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    cores = len(os.sched_getaffinity(0))
    start = time.perf_counter()
    if kind == "lorakit":
        from lorakit.data.pipeline import DataConfig, build_dataset

        os.environ["LORAKIT_DATA_CACHE"] = folder
        config = DataConfig(dataset=path, max_length=MAX_LENGTH, num_proc=cores)
        data = build_dataset(config, tokenizer)
        rows, tokens = len(data), data.samples.meta["tokens"]
    else:
        import datasets

        datasets.disable_progress_bars()
        table = datasets.load_dataset("json", data_files=path, split="train", cache_dir=folder)

        def render(example):
            out = tokenizer.apply_chat_template(
                example["messages"], tokenize=True, return_dict=True
            )
            return {"input_ids": out["input_ids"][:MAX_LENGTH]}

        table = table.map(render, num_proc=cores, remove_columns=table.column_names)
        rows, tokens = len(table), 0
        for batch in table.select_columns("input_ids").iter(batch_size=10_000):
            tokens += sum(len(ids) for ids in batch["input_ids"])
    took = time.perf_counter() - start
    return {"seconds": took, "rows": rows, "tokens": tokens, **_peaks()}


def _measure(kind: str, path: Path, folder: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, kind, str(path), str(folder)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def first_step(path: Path, cache: Path, out: Path) -> tuple[float, float]:
    """(seconds from starting `lorakit train` to the dataset's summary line, to its end after
    one optimizer step)."""
    config = out.parent / f"{out.name}.yaml"
    settings = {
        "output_dir": str(out),
        "data": {"dataset": str(path), "max_length": MAX_LENGTH},
        "train": {"max_steps": 1, "batch_size": 1, "progress": "none", "plots": False}
        | {"tensorboard": False},
    }
    config.write_text(json.dumps(settings))
    env = {**os.environ, "LORAKIT_DATA_CACHE": str(cache), "PYTHONPATH": str(ROOT / "src")}
    start = time.perf_counter()
    ready = float("nan")
    with subprocess.Popen(
        [sys.executable, "-m", "lorakit", "train", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    ) as process:
        for line in process.stdout or []:
            if " rows used, " in line and ready != ready:
                ready = time.perf_counter() - start
    if process.returncode:
        raise RuntimeError(f"lorakit train {config} failed ({process.returncode})")
    return ready, time.perf_counter() - start


def run_sizes(sizes: list[int], train: str) -> None:
    """The table: one row per size."""
    print(
        "| conversations | tokens | lorakit first run s (conv/s) | peak RSS MB (workers) "
        "| cached s | cached RSS MB | datasets.map s (conv/s) | peak RSS MB (workers) "
        "| speed-up | train: first step, first run s (data ready) | cached s (data ready) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            path = synthetic_file(tmp / f"chat-{n}.jsonl", n)
            cold = _measure("lorakit", path, tmp / "cache")
            warm = _measure("lorakit", path, tmp / "cache")
            ref = _measure("reference", path, tmp / "hf")
            steps = ["-", "-"]
            if train == "both":  # a first run into an empty cache, then a run reading it
                steps[0] = "{:.1f} (data {:.1f})".format(
                    *first_step(path, tmp / "cache2", tmp / "run1")[::-1]
                )
            if train in ("both", "cached"):
                steps[1] = "{:.1f} (data {:.1f})".format(
                    *first_step(path, tmp / "cache", tmp / "run2")[::-1]
                )
            print(
                f"| {n:,} | {cold['tokens']:,} | {cold['seconds']:.1f} "
                f"({n / cold['seconds']:,.0f}) | {cold['rss_mb']:.0f} "
                f"({cold['worker_rss_mb']:.0f}) | {warm['seconds']:.2f} | {warm['rss_mb']:.0f} "
                f"| {ref['seconds']:.1f} ({n / ref['seconds']:,.0f}) | {ref['rss_mb']:.0f} "
                f"({ref['worker_rss_mb']:.0f}) | {ref['seconds'] / cold['seconds']:.2f}x "
                f"| {steps[0]} | {steps[1]} |",
                flush=True,
            )


if __name__ == "__main__":
    print(json.dumps(worker(*sys.argv[1:4])))
