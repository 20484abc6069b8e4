"""Training and decoding on one device, lorakit against peft: the GPU check's benchmark.

    python benchmarks/bench_device.py --device cuda                  # built-in + 0.5B-shaped
    python benchmarks/bench_device.py --device cpu --models tiny --steps 1 --no-compile

Per model (`builtin`: SmolLM2-135M-Instruct; `random-0.5b`: a Llama of Qwen2.5-0.5B's shape
with random weights; `tiny`: bench_train.py's tiny Llama), in one process, one engine at a
time on a fresh copy of the model:

- train: batch 8 x 256, r=16 on all 7 projections, dropout 0.05, bf16 autocast, AdamW;
  lorakit (train(), base stored in bf16), lorakit + train.compile, peft, peft + torch.compile
  (each decoder layer), and lorakit QLoRA (NF4, double quantization, bf16 compute). tokens/s
  over `--steps` steps after one warmup step (compile happens there: `first s`), peak memory.
- decode: greedy, batch 1, a 32-token prompt, `--new-tokens` tokens, adapter unmerged, bf16
  weights; lorakit's LoraModel and peft's PeftModel with the same adapter weights; tokens/s and
  whether both produced the same tokens.

One table is printed at the end (`|`-separated, ready for docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from bench_train import ADAPTERS, BATCH, LENGTH, build_model, make_batches  # noqa: E402

SHAPES = {  # random-weight models of a real model's shape
    "random-0.5b": dict(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    ),
}


def load(name: str):
    """The base model on the CPU in fp32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if name in SHAPES:
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**SHAPES[name])).float()
    return build_model(name)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_mb(device) -> float:
    import torch

    from lorakit.train.runtime import peak_memory_mb

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_memory_mb(device)


def reset_peak(device) -> None:
    from lorakit.train.runtime import reset_peak_memory

    reset_peak_memory(device)


def lora_kwargs(dropout: float) -> dict:
    r, targets = ADAPTERS["all-r16"]
    return {"r": r, "lora_alpha": 2 * r, "lora_dropout": dropout, "target_modules": targets}


def train_lorakit(base, batches, device, compile_: bool, qlora: bool) -> dict:
    import torch

    from lorakit import LoraConfig, get_peft_model
    from lorakit.quant import prepare_model_for_kbit_training, quantize_model
    from lorakit.train import TrainConfig, train

    if qlora:  # NF4 base, then the adapter, as `lorakit train` does for QLoRA
        quantize_model(base, "nf4", double_quant=True, compute_dtype=torch.bfloat16)
        prepare_model_for_kbit_training(base, gradient_checkpointing=False)
    model = get_peft_model(base, LoraConfig(**lora_kwargs(0.05)))
    config = TrainConfig(
        precision="bf16",
        max_steps=len(batches),
        shuffle=False,
        plots=False,
        lr=1e-4,
        scheduler="constant",
        progress="none",
        tensorboard=False,
        device=device.type,
        compile=compile_,
    )
    reset_peak(device)
    with tempfile.TemporaryDirectory() as out:
        result = train(model, None, batches, None, config, out)
    rows = [r for r in result.history if r["kind"] == "train"]
    timed = rows[1:] or rows
    return {
        "tokens_per_s": sum(r["tokens"] for r in timed) / sum(r["step_s"] for r in timed),
        "first_s": rows[0]["step_s"],
        "peak_mb": peak_mb(device),
    }


def train_peft(base, batches, device, compile_: bool) -> dict:
    import peft
    import torch

    model = peft.get_peft_model(base.to(device), peft.LoraConfig(**lora_kwargs(0.05)))
    model.train()
    if compile_:  # regional compilation: each decoder layer
        names = set(model.get_base_model()._no_split_modules)
        for module in model.modules():
            if type(module).__name__ in names:
                module.compile(dynamic=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    reset_peak(device)
    times, tokens = [], []
    for batch in batches:
        inputs = {k: v.to(device) for k, v in batch.items() if v is not None}
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(**inputs, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t0)
        tokens.append(inputs["input_ids"].numel())
    timed = slice(1, None) if len(times) > 1 else slice(None)
    return {
        "tokens_per_s": sum(tokens[timed]) / sum(times[timed]),
        "first_s": times[0],
        "peak_mb": peak_mb(device),
    }


def decode(base, device, new_tokens: int) -> list[dict]:
    """Greedy decoding with one unmerged adapter (random B), lorakit and peft, bf16 weights."""
    import peft
    import torch

    from lorakit import LoraConfig, get_peft_model

    kwargs = {**lora_kwargs(0.0), "init_lora_weights": False}
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(**kwargs)).to(device, torch.bfloat16)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    theirs.load_state_dict(ours.state_dict(), strict=False)  # the same adapter weights
    theirs = theirs.to(device, torch.bfloat16)
    prompt = torch.randint(0, base.config.vocab_size, (1, 32), generator=torch.Generator())
    prompt = prompt.to(device)
    out, tokens = [], {}
    for name, model in (("lorakit", ours), ("peft", theirs)):
        model.eval()
        settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        with torch.inference_mode():
            model.generate(prompt, max_new_tokens=4, do_sample=False)  # warm up
            sync(device)
            t0 = time.perf_counter()
            ids = model.generate(prompt, **settings)
            sync(device)
        tokens[name] = ids[0, prompt.shape[1] :].tolist()
        out.append({"engine": name, "tokens_per_s": new_tokens / (time.perf_counter() - t0)})
    same = tokens["lorakit"] == tokens["peft"]
    for row in out:
        row["same_tokens"] = same
    return out


def run_model(name: str, args, device) -> list[dict]:
    base = load(name)
    batches = make_batches(base.config.vocab_size, False, False, args.steps + 1)
    batches = [{k: v if v is None else v[: args.rows] for k, v in b.items()} for b in batches]
    engines = [("lorakit", lambda b: train_lorakit(b, batches, device, False, False))]
    engines.append(("peft", lambda b: train_peft(b, batches, device, False)))
    if args.compile:
        engines.append(
            ("lorakit+compile", lambda b: train_lorakit(b, batches, device, True, False))
        )
        engines.append(("peft+compile", lambda b: train_peft(b, batches, device, True)))
    engines.append(("lorakit QLoRA nf4", lambda b: train_lorakit(b, batches, device, False, True)))
    rows = []
    for engine, run in engines:
        try:
            result = run(copy.deepcopy(base))
        except Exception as err:  # one engine failing must not hide the others' numbers
            result = {"error": f"{type(err).__name__}: {err}"[:120]}
        rows.append({"model": name, "task": "train bf16", "engine": engine, **result})
        print(rows[-1], flush=True)
    try:
        for result in decode(base, device, args.new_tokens):
            rows.append({"model": name, "task": "decode bf16", **result})
            print(rows[-1], flush=True)
    except Exception as err:
        rows.append({"model": name, "task": "decode bf16", "engine": "both", "error": str(err)})
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| model | task | engine | tokens/s | first step s | peak MB | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['model']} | {r['task']} | {r['engine']} | - | - | - | {r['error']} |"
            )
            continue
        first = f"{r['first_s']:.1f}" if "first_s" in r else "-"
        peak = f"{r['peak_mb']:.0f}" if "peak_mb" in r else "-"
        note = (
            ("same greedy tokens" if r["same_tokens"] else "tokens differ")
            if "same_tokens" in r
            else ""
        )
        lines.append(
            f"| {r['model']} | {r['task']} | {r['engine']} | {r['tokens_per_s']:.0f} | {first} "
            f"| {peak} | {note} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", default="builtin,random-0.5b")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warmup")
    parser.add_argument("--rows", type=int, default=BATCH, help="rows per batch (of 256)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    args = parser.parse_args()
    import torch

    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, batch {args.rows} x {LENGTH}", flush=True)
    rows = [row for model in args.models.split(",") for row in run_model(model, args, device)]
    print(table(rows))


if __name__ == "__main__":
    main()
