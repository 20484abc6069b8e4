"""LoRA on a plain `nn.Sequential` classifier, trained with a plain PyTorch loop.

A small MLP is first trained on one task (which side of a line a 2-D point lies on); LoRA then
adapts it to a rotated line while the original weights stay frozen. Only the adapter (and the
output layer, via modules_to_save) trains.

    python examples/01_sequential_classifier.py [--tiny]
"""

from __future__ import annotations

import argparse
import math
import os

import torch
from torch import nn

from lorakit import LoraConfig, get_peft_model


def make_task(n: int, angle: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Points in the plane (n, 2) and labels: 1 when left of the line at `angle`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    normal = torch.tensor([-math.sin(angle), math.cos(angle)])
    return x, (x @ normal > 0).long()


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> None:
    """Full-batch AdamW on the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of correct predictions."""
    return (model(x).argmax(-1) == y).float().mean().item()


def main() -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", default=bool(os.environ.get("TINY")))
    args = parser.parse_args()
    steps, points = (40, 512) if args.tiny else (300, 2048)
    torch.manual_seed(0)

    model = nn.Sequential(
        nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)
    )
    x_a, y_a = make_task(points, 0.0, seed=1)
    fit(model, x_a, y_a, steps, lr=1e-2)
    x_b, y_b = make_task(points, math.radians(60), seed=2)
    before = accuracy(model, x_b, y_b)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}

    # In an nn.Sequential the layers are named "0", "2", "4": adapt the hidden layers, train
    # the output layer whole.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], modules_to_save=["4"])
    lora = get_peft_model(model, config)
    lora.print_trainable_parameters()
    fit(lora, x_b, y_b, steps, lr=1e-2)
    after = accuracy(lora, x_b, y_b)
    print(f"accuracy on the rotated task: {before:.1%} before LoRA -> {after:.1%} after")

    base = lora.get_base_model()
    assert torch.equal(base[0].base_layer.weight, frozen["0.weight"])  # the base stayed frozen
    with lora.disable_adapter():
        assert accuracy(lora, x_b, y_b) == before
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
