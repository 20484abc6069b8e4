"""Time per generated token of `lorakit generate` / `chat` against the base model and peft.

One adapter (r=16 on all 7 projections, random A and B, saved in peft's format) on the built-in
model, fp32, batch 1, greedy. Four models decode the same prompt in one process, interleaved
round by round: the base model alone; the model as `lorakit generate` prepares it
(`cli.generate.prepare_model`, which merges adapters into a float32 base); the adapter loaded
unmerged (`jobs.evaluation.load_with_adapters`, what generate ran before merging); and peft's
`PeftModel.from_pretrained`. Prints the median ms per token of each, its ratio to the base, and
whether each produced the same greedy tokens as the unmerged lorakit model. Usage:

    python benchmarks/bench_generate.py [--prompt 32] [--new-tokens 48] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import peft
import torch
from shapes import TARGETS
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.cli.generate import prepare_model
from lorakit.jobs.evaluation import load_with_adapters
from lorakit.models import ensure_builtin_model
from lorakit.serve.registry import parse_adapters


def per_token_ms(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
    )
    return 1e3 * (time.perf_counter() - start) / new_tokens, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    path = str(ensure_builtin_model())
    adapter = tempfile.mkdtemp(prefix="bench_generate_")
    torch.manual_seed(0)
    config = lorakit.LoraConfig(
        r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False
    )
    fresh = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    lorakit.get_peft_model(fresh, config).save_pretrained(adapter)
    unmerged, _ = load_with_adapters(path, parse_adapters([adapter]), "float32", "cpu")
    models = {
        "base": AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        "lorakit generate (merged)": prepare_model(path, [adapter], None, "float32", "cpu")[0],
        "lorakit unmerged": unmerged,
        "peft unmerged": peft.PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), adapter
        ),
    }
    for model in models.values():
        model.eval()
    ids = torch.randint(0, 49152, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in models}
    tokens = {}
    with torch.no_grad():
        for name, model in models.items():  # warm-up, and each one's tokens
            tokens[name] = per_token_ms(model, ids, args.new_tokens)[1]
        for round_ in range(args.repeats):
            order = list(models.items())
            for name, model in order if round_ % 2 == 0 else order[::-1]:
                times[name].append(per_token_ms(model, ids, args.new_tokens)[0])
    print(
        f"built-in model (SmolLM2-135M), fp32, batch 1, prompt {args.prompt}, "
        f"{args.new_tokens} new tokens, greedy, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, CPU {torch.backends.cpu.get_cpu_capability()}"
    )
    base = statistics.median(times["base"])
    reference = tokens["lorakit unmerged"]
    for name, values in times.items():
        ms = statistics.median(values)
        same = "-" if name == "base" else torch.equal(tokens[name], reference)
        print(f"{name:<26} {ms:6.1f} ms/token  {ms / base:5.2f}x base   same tokens: {same}")


if __name__ == "__main__":
    main()
