"""From scratch with the functional API: inject LoRA into a model, train with warmup, save and
load only the adapter weights, merge, and verify the merge.

The base is a small random Llama built from a config; the task is to continue counting
sequences (token t is followed by t + 1), which a random model cannot do and LoRA learns.

    python examples/03_from_scratch.py [--tiny]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lorakit import LoraLinear, check_gradients, check_injection, inject_lora, lora_state_dict

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base(hidden: int, layers: int):
    """A random LlamaForCausalLM (the same weights every time: seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def counting_batch(g: torch.Generator, rows: int = 16, length: int = 24) -> torch.Tensor:
    """Rows that count up by one from a random start, modulo the vocabulary: (rows, length)."""
    start = torch.randint(0, 128, (rows, 1), generator=g)
    return (start + torch.arange(length)) % 128


def warmup_then_linear(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warmup to 1, then linear decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def main() -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", default=bool(os.environ.get("TINY")))
    args = parser.parse_args()
    hidden, layers, steps = (32, 2, 6) if args.tiny else (128, 4, 300)

    model = inject_lora(build_base(hidden, layers), TARGETS, rank=8, lora_alpha=16)
    print(check_injection(model))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_then_linear(s, warmup, steps)
    )
    g = torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        ids = counting_batch(g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == 1:  # (at step 0, B = 0 so A's gradient is zero by design)
            assert not check_gradients(model), "every LoRA parameter gets a gradient"
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(
                f"step {step + 1}/{steps}: loss {loss.item():.3f} "
                f"lr {schedule.get_last_lr()[0]:.2e}"
            )
    model.eval()

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "adapter.safetensors"
        save_file({k: v.contiguous() for k, v in lora_state_dict(model).items()}, str(path))
        size_kib = path.stat().st_size / 1024
        print(f"saved only the adapter: {len(load_file(str(path)))} tensors, {size_kib:.0f} KiB")
        fresh = inject_lora(build_base(hidden, layers), TARGETS, rank=8, lora_alpha=16)
        missing, unexpected = fresh.load_state_dict(load_file(str(path)), strict=False)
        assert not unexpected and all("lora_" not in k for k in missing)

    test = counting_batch(torch.Generator().manual_seed(1))
    with torch.no_grad():
        unmerged = fresh(input_ids=test).logits
        for module in fresh.modules():
            if isinstance(module, LoraLinear):
                module.merge()  # W <- W + scaling * B @ A
        merged = fresh(input_ids=test).logits
    diff = (merged - unmerged).abs().max().item()
    correct = (merged[:, :-1].argmax(-1) == test[:, 1:]).float().mean().item()
    print(f"merged vs unmerged logits: max |diff| = {diff:.2e}; next-token accuracy {correct:.1%}")
    assert diff < 1e-4
    return {"loss": loss.item(), "merge_diff": diff, "accuracy": correct}


if __name__ == "__main__":
    main()
