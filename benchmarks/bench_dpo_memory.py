"""Peak memory of DPO on the built-in model: lorakit's loop, TRL + peft, TRL + lorakit.

    python benchmarks/bench_dpo_memory.py                 # every variant, 2 steps each
    python benchmarks/bench_dpo_memory.py --json out.json

Each variant runs in a process of its own (so its peak resident memory, `ru_maxrss`, is its
own): the built-in SmolLM2-135M-Instruct in fp32, LoRA r=16 on the 7 projections, 2 DPO steps
of 4 built-in `concise` pairs (beta 0.1, fp32, CPU). Printed: the peak resident memory, the
memory of the base model loaded alone (the same process up to that point), and how many times
a base model was loaded.

- `lorakit`: `method: dpo` in lorakit's loop (reference: the adapter off).
- `trl+peft`: TRL's `DPOTrainer(model=base, peft_config=peft.LoraConfig(...))`.
- `trl+lorakit ref_model=reference_model`: a lorakit model with `lorakit.reference_model`.
- `trl+lorakit ref_model=None`: a lorakit model as a peft user would pass it; TRL does not see
  an adapter model and loads a second base as the reference.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ["lorakit", "trl+peft", "trl+lorakit-reference_model", "trl+lorakit-None"]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _count_loads() -> list[str]:
    """Every `from_pretrained` of a model class, recorded."""
    import transformers

    loads: list[str] = []
    original = transformers.PreTrainedModel.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(str(args[0]) if args else "?")
        return original(cls, *args, **kwargs)

    transformers.PreTrainedModel.from_pretrained = classmethod(counting)
    return loads


def _lorakit(workdir: Path) -> float:
    from lorakit import LoraConfig, get_peft_model
    from lorakit.data.pipeline import DataConfig
    from lorakit.data.preference import build_preference_dataset
    from lorakit.models import BUILTIN_MODEL, load_model, load_tokenizer
    from lorakit.train import TrainConfig, train
    from lorakit.train.config import PreferenceConfig

    tokenizer = load_tokenizer(BUILTIN_MODEL)
    model = get_peft_model(
        load_model(BUILTIN_MODEL, dtype="float32"), LoraConfig(r=16, target_modules=TARGETS)
    )
    base_mb = _rss_mb()
    data = build_preference_dataset(DataConfig(dataset="concise", limit=8), tokenizer)
    config = TrainConfig(
        max_steps=2,
        batch_size=4,
        precision="fp32",
        progress="none",
        tensorboard=False,
        plots=False,
        preference=PreferenceConfig(method="dpo", beta=0.1),
    )
    train(model, tokenizer, data, None, config, workdir / "run")
    return base_mb


def _trl(variant: str, workdir: Path) -> float:
    import datasets
    import trl

    from lorakit.data.pipeline import DataConfig
    from lorakit.data.preference import load_pairs
    from lorakit.models import BUILTIN_MODEL, load_model, load_tokenizer

    tokenizer = load_tokenizer(BUILTIN_MODEL)
    base = load_model(BUILTIN_MODEL, dtype="float32")
    base_mb = _rss_mb()
    _, pairs = load_pairs(DataConfig(dataset="concise", limit=8))
    rows = [
        {
            "prompt": p[0][-1]["content"],
            "chosen": p[1][0]["content"],
            "rejected": p[2][0]["content"],
        }
        for _, p in pairs
    ]
    kwargs = {}
    if variant == "trl+peft":
        import peft

        model, kwargs["peft_config"] = base, peft.LoraConfig(r=16, target_modules=TARGETS)
    else:
        import lorakit

        model = lorakit.get_peft_model(base, lorakit.LoraConfig(r=16, target_modules=TARGETS))
        if variant.endswith("reference_model"):
            kwargs["ref_model"] = lorakit.reference_model(model)
    args = trl.DPOConfig(
        output_dir=str(workdir / "trl"),
        per_device_train_batch_size=4,
        max_steps=2,
        beta=0.1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
    )
    trainer = trl.DPOTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        **kwargs,
    )
    trainer.train()
    return base_mb


def child(variant: str) -> None:
    loads = _count_loads()
    with tempfile.TemporaryDirectory() as tmp:
        base_mb = _lorakit(Path(tmp)) if variant == "lorakit" else _trl(variant, Path(tmp))
    print(
        json.dumps(
            {
                "variant": variant,
                "peak_mb": _rss_mb(),
                "base_mb": base_mb,
                "model_loads": len(loads),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=VARIANTS)
    parser.add_argument("--variants", nargs="*", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    results = []
    for variant in args.variants:
        done = subprocess.run(
            [sys.executable, __file__, "--child", variant], capture_output=True, text=True
        )
        if done.returncode != 0:
            print(f"{variant}: failed\n{done.stderr[-2000:]}")
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(result)
        print(
            f"{variant:32s} peak {result['peak_mb']:7.0f} MB  base loaded "
            f"{result['base_mb']:6.0f} MB  model loads {result['model_loads']}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
