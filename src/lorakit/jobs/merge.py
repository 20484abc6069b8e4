"""Verified merge and export: base + adapter -> one plain Hugging Face model folder.

Before anything is written, the merged model's logits are compared with the unmerged model's
(base + adapter) on a few inputs, in fp32 (a 16-bit output is cast after the check); a merge
with non-finite weights, or whose logits differ by more than the tolerance, is refused. The
folder holds safetensors weights, the tokenizer and the chat template, and loads with plain
transformers (no lorakit needed). After writing, the folder is loaded back with transformers
and its logits are compared again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import AdapterError, ConfigError
from lorakit.files import apply_umask, atomic_dir, staging_dir
from lorakit.lora.model import LoraModel
from lorakit.models import chat_template_of, load_model, load_tokenizer
from lorakit.models.vocab import adapter_tokenizer, fit_vocabulary

# Largest allowed |merged - unmerged| logit. The merge is done and checked in fp32, where the two
# differ only by summation order; a 16-bit output is cast afterwards and its extra rounding is
# reported (reload difference), not refused.
TOLERANCE = 1e-3
PROMPTS = [
    "Who are you?",
    "Write one sentence about the sea.",
    "What is 12 times 7?",
]
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class MergeReport:
    """What `merge_and_export` did and measured."""

    output_dir: Path
    max_abs_diff: float
    reload_max_abs_diff: float
    tolerance: float
    inputs: int
    dtype: str
    dequantized: str | None = None

    def lines(self) -> list[str]:
        """A human summary, one fact per line."""
        out = []
        if self.dequantized:
            out.append(f"quantized base: {self.dequantized} before merging")
        out += [
            f"merged vs unmerged logits on {self.inputs} inputs: max |diff| = "
            f"{self.max_abs_diff:.3g} (fp32, tolerance {self.tolerance:g})",
            f"reloaded with plain transformers ({self.dtype}): max |diff| = "
            f"{self.reload_max_abs_diff:.3g}"
            + (" (includes rounding the weights to 16 bits)" if self.dtype != "float32" else ""),
            f"wrote {self.output_dir} (safetensors, tokenizer, chat template)",
        ]
        return out


def encode_prompts(tokenizer: Any, prompts: list[str], template: str | None) -> dict:
    """A padded batch of prompts (chat-formatted when there is a template)."""
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}],
            chat_template=template,
            tokenize=False,
            add_generation_prompt=True,
        )
        if template
        else p
        for p in prompts
    ]
    tokenizer.padding_side = "right"
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not template)


@torch.no_grad()
def logits_of(model: nn.Module, batch: dict) -> torch.Tensor:
    """fp32 logits (B, T, V) at the real (unpadded) positions set to 0 elsewhere."""
    model.eval()
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    logits = model(**inputs).logits.float().cpu()
    return logits * batch["attention_mask"].unsqueeze(-1)


def check_finite(model: nn.Module) -> None:
    """Raise AdapterError naming the first parameter with NaN or inf values."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and not torch.isfinite(param).all():
            raise AdapterError(
                f"the merge produced non-finite weights in {name}; nothing was written. The "
                "adapter holds extreme values: check it with `lorakit inspect`"
            )


def merge_model(lora: LoraModel) -> nn.Module:
    """merge_and_unload with a NaN/inf check; errors become AdapterError."""
    try:
        merged = lora.merge_and_unload(safe_merge=True)
    except (ValueError, RuntimeError) as error:
        raise AdapterError(f"merge refused: {error}; nothing was written") from None
    check_finite(merged)
    return merged


def save_folder(model: nn.Module, tokenizer: Any, template: str | None, out: Path) -> None:
    """Write a plain HF folder atomically (`files.atomic_dir`): staged, fsynced, then swapped
    with an older folder at `out` in one step, so `out` is never missing; the old one is then
    removed with everything it held."""
    with atomic_dir(out) as staging:
        model.config.use_cache = True
        model.save_pretrained(staging, safe_serialization=True)
        if template:
            tokenizer.chat_template = template
        tokenizer.save_pretrained(staging)
        apply_umask(staging)


def check_output(out: Path, sources: list[tuple[str, Path]], overwrite: bool) -> None:
    """Refuse, before any work, an OUT that is a symlink or a file, that is (or holds) a folder
    the merge reads, that is not empty without `overwrite`, or where nothing can be written."""
    if out.is_symlink():
        raise ConfigError(f"OUT {out} is a symlink; give the path of a real folder to write")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"OUT {out} exists and is not a folder; choose another OUT")
    real = out.resolve()
    for role, source in sources:
        if source.exists() and (real == source.resolve() or real in source.resolve().parents):
            raise ConfigError(
                f"OUT {out} {'is' if real == source.resolve() else 'holds'} the {role} folder "
                f"the merge reads ({source}); writing there would destroy it, so it is refused "
                "even with --overwrite: choose another OUT"
            )
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"OUT {out} exists and is not empty; pass --overwrite or choose another")
    existing = next(p for p in [real, *real.parents] if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"cannot write OUT {out}: {existing} is a file, not a folder")
    try:
        os.rmdir(staging_dir(existing, "write-test"))
    except OSError as error:
        raise ConfigError(f"cannot write OUT {out}: {error.strerror} in {existing}") from None


def merge_and_export(
    base: str,
    adapter: str | Path,
    output_dir: str | Path,
    *,
    dtype: str = "float32",
    quantization: str | None = None,
    device: str = "cpu",
    prompts: list[str] | None = None,
    tolerance: float | None = None,
    overwrite: bool = False,
) -> MergeReport:
    """Merge `adapter` into `base`, check the logits, write a plain HF folder, check it again."""
    out = Path(output_dir)
    check_output(out, [("base model", Path(base)), ("adapter", Path(adapter))], overwrite)
    if dtype not in _TORCH_DTYPES:
        raise ConfigError(f"dtype `{dtype}`: expected one of {', '.join(_TORCH_DTYPES)}")
    tolerance = TOLERANCE if tolerance is None else tolerance
    tokenizer = adapter_tokenizer([adapter]) or load_tokenizer(base)
    model = load_model(base, dtype="float32", device=device, quantization=quantization)
    fit_vocabulary(model, tokenizer)  # an adapter trained with added tokens
    dequantized = None
    if quantization is not None:
        from lorakit.quant.layer import dequantize_model

        model, dequantized = dequantize_model(model, torch.float32)
    lora = LoraModel.from_pretrained(model, adapter)
    template = lora.chat_template or chat_template_of(tokenizer)
    batch = encode_prompts(tokenizer, prompts or PROMPTS, template)
    unmerged = logits_of(lora, batch)
    merged = merge_model(lora)
    diff = float((logits_of(merged, batch) - unmerged).abs().max())
    if not diff <= tolerance:
        raise AdapterError(
            f"merged and unmerged logits differ by {diff:.3g} > tolerance {tolerance:g}; "
            "nothing was written (pass --tolerance to accept it)"
        )
    try:
        save_folder(merged.to(_TORCH_DTYPES[dtype]), tokenizer, template, out)
    except OSError as error:
        raise ConfigError(f"cannot write {out}: {error}; nothing was written there") from None
    reload_diff = _reload_diff(out, batch, unmerged)
    return MergeReport(
        out, diff, reload_diff, tolerance, len(batch["input_ids"]), dtype, dequantized
    )


def _reload_diff(out: Path, batch: dict, reference: torch.Tensor) -> float:
    """Load the written folder with plain transformers and compare its logits."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    return float((logits_of(reloaded, batch) - reference).abs().max())
