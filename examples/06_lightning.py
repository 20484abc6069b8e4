"""The same LoRA model trained by a PyTorch Lightning `LightningModule`.

The module holds a lorakit LoraModel; Lightning runs the loop (optimizer, schedule, logging),
and the adapter is saved in peft format at the end and loaded back to check it.

    python examples/06_lightning.py [--tiny] [--model DIR_OR_ALIAS] [--output DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import pytorch_lightning as pl
import torch

from lorakit import LoraConfig, LoraModel, get_peft_model
from lorakit.data.batches import model_inputs
from lorakit.data.pipeline import DataConfig, build_dataset, collate_batch, plan_epoch
from lorakit.models import BUILTIN_MODEL, chat_template_of, load_model, load_tokenizer


class LoraModule(pl.LightningModule):
    """A causal LM with a LoRA adapter; only the adapter is optimized."""

    def __init__(self, model: LoraModel, lr: float, total_steps: int) -> None:
        super().__init__()
        self.model, self.lr, self.total_steps = model, lr, total_steps

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.lr, total_steps=self.total_steps, pct_start=0.1
        )
        return [optimizer], [{"scheduler": schedule, "interval": "step"}]


def main() -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", default=bool(os.environ.get("TINY")))
    parser.add_argument("--model", default=BUILTIN_MODEL)
    parser.add_argument("--output", default=None, help="Adapter dir (default: a temp dir)")
    args = parser.parse_args()
    steps = 2 if args.tiny else 30
    pl.seed_everything(0, verbose=False)

    tokenizer = load_tokenizer(args.model)
    data = build_dataset(DataConfig(dataset="identity", max_length=256, packing=True), tokenizer)
    batches = [model_inputs(collate_batch(data, rows)) for rows in plan_epoch(data, 4, seed=0)]
    lora = get_peft_model(
        load_model(args.model), LoraConfig(r=8, lora_alpha=16, target_modules="preset")
    )
    lora.chat_template = chat_template_of(tokenizer)

    lora.train()  # from_pretrained returns the base in eval mode
    module = LoraModule(lora, lr=2e-3, total_steps=steps)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        precision="bf16-mixed",
        log_every_n_steps=1,
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=True)
    trainer.fit(module, loader)
    loss = float(trainer.callback_metrics["train_loss"])

    out = Path(args.output or tempfile.mkdtemp(prefix="lorakit-lightning-"))
    lora.save_pretrained(out)
    reloaded = LoraModel.from_pretrained(load_model(args.model), out)
    batch = batches[0]
    with torch.no_grad():
        lora.eval()
        diff = (reloaded(**batch).logits - lora(**batch).logits).abs().max().item()
    print(
        f"Lightning trained {steps} steps (last loss {loss:.3f}); adapter saved to {out}; "
        f"reloaded logits match to {diff:.1e}"
    )
    return {"loss": loss, "reload_diff": diff}


if __name__ == "__main__":
    main()
