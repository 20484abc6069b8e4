"""What `lorakit train` runs: a RunConfig to a trained model (LoRA, QLoRA or full fine-tuning),
its exact match scored at the end when the config asks (`evaluation.score_answers`)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from lorakit.data.pipeline import build_dataset, prompt_template
from lorakit.data.preference import build_preference_dataset
from lorakit.errors import ConfigError
from lorakit.jobs.evaluation import score_answers
from lorakit.jobs.preflight import check_run
from lorakit.jobs.run_config import RunConfig
from lorakit.lora import inits
from lorakit.lora.model import LoraModel, get_peft_model
from lorakit.lora.tokens import new_token_rows
from lorakit.models import RAW_TEMPLATE
from lorakit.models.vocab import add_tokens
from lorakit.train.loop import train
from lorakit.train.rundir import delete_run
from lorakit.train.runtime import is_main_process, resolve_device, seed_everything
from lorakit.train.setup import TrainResult


def build_model(run: RunConfig, show: Callable[[str], None] = print) -> tuple[nn.Module, Any]:
    """The model to train (a LoraModel, or the whole model for method=full) and its tokenizer."""
    from lorakit.models import load_model_and_tokenizer

    if run.method == "full" and run.model.quantization:
        raise ConfigError(
            f"method=full with model.quantization={run.model.quantization!r}: quantized weights "
            "cannot be trained; use method=lora (QLoRA) or drop model.quantization"
        )
    model, tokenizer = load_model_and_tokenizer(run.model)
    new_ids = _add_tokens(run, model, tokenizer, show)
    if run.method == "full":
        model.requires_grad_(True)
        show(f"full fine-tuning: {sum(p.numel() for p in model.parameters()):,} parameters")
        return model, tokenizer
    if run.model.quantization:
        from lorakit.quant.layer import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(model, run.train.gradient_checkpointing)
    seed_everything(run.train.seed)  # lora_A's random start: the same seed, the same run
    config = run.lora.to_lora_config()
    if new_ids:
        config.trainable_token_indices = new_token_rows(model, new_ids, config.modules_to_save)
    lora = get_peft_model(model, config)
    lora.chat_template = prompt_template(run.data, tokenizer)
    trainable, total = lora.get_nb_trainable_parameters()
    show(f"LoRA: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")
    return lora, tokenizer


def run_training(
    run: RunConfig,
    *,
    resume: str | None = None,
    force: bool = False,
    overwrite: bool = False,
    show: Callable[[str], None] = print,
) -> TrainResult:
    """Load, tokenize, train and (optionally) score exact match, as the run config says.

    Under torchrun only rank 0 reports through `show`; errors raise on every rank."""
    output_dir = Path(run.output_dir)
    if not is_main_process():
        show = _silent
    for warning in check_run(run, resume, overwrite):  # what `lorakit validate` checks
        show(f"warning: {warning}")
    if overwrite and is_main_process():
        for path in delete_run(output_dir):
            show(f"deleted {path} (--overwrite: the run starts over)")
    model, tokenizer = build_model(run, show)
    initial = _initial_adapter(model)  # PiSSA / OLoRA: to convert the final adapter against
    build = build_preference_dataset if run.preference_tuning else build_dataset
    if run.preference_tuning:
        train_set = build_preference_dataset(run.data, tokenizer)
    else:  # a line every few seconds while rows are tokenized
        train_set = build_dataset(run.data, tokenizer, progress=show)
    if train_set.raw_text and isinstance(model, LoraModel):  # samples and the saved adapter:
        model.chat_template = RAW_TEMPLATE  # prompts as plain text, no chat turns around them
    show(train_set.summary())
    eval_config = run.eval_data_config()
    eval_set = build(eval_config, tokenizer) if eval_config else None
    if eval_set is not None:
        show(eval_set.summary())
    result = train(
        model,
        tokenizer,
        train_set,
        eval_set,
        run.train_config(),
        output_dir,
        resume=resume,
        force=force,
        run_config=run.model_dump(mode="json"),
        resume_settings=run.resume_settings(),
    )
    if initial is not None:
        with initial:
            for folder in (result.final_dir, result.best_dir):
                if folder is not None and is_main_process():
                    model.save_pretrained(
                        folder, path_initial_model_for_weight_conversion=initial.name
                    )
        if result.final_dir is not None:
            show("final adapter: written as the plain LoRA (rank 2r) for the original base model")
    if result.final_dir is not None and run.method == "full":
        tokenizer.save_pretrained(result.final_dir)
    elif run.model.add_tokens and is_main_process():  # the adapter's rows need its vocabulary
        for folder in (result.final_dir, result.best_dir):
            if folder is not None:
                tokenizer.save_pretrained(folder)
    if eval_config is not None and run.eval.exact_match and not result.interrupted:
        device = resolve_device(run.train.device)
        score = score_answers(model, tokenizer, eval_config, run.eval.max_new_tokens, device)
        show(f"exact match: {score['exact_match']:.1%} of {score['answers']} answers")
    if result.final_dir is not None:
        show(f"final model: {result.final_dir}")
    show(f"plots: {output_dir / 'plots'}; metrics: {output_dir / 'metrics.jsonl'}")
    return result


def _initial_adapter(model: nn.Module) -> tempfile.TemporaryDirectory | None:
    """A folder holding the adapter as initialised, when its initialisation changed the base
    (PiSSA, OLoRA): the trained adapter is converted against it to fit the original base."""
    if not isinstance(model, LoraModel):
        return None
    if not inits.is_mutating(model.active_peft_config.init_lora_weights):
        return None
    folder = tempfile.TemporaryDirectory(prefix="lorakit-initial-adapter-")
    model.save_pretrained(folder.name)
    return folder


def _add_tokens(run: RunConfig, model: nn.Module, tokenizer: Any, show) -> list[int]:
    """`model.add_tokens` added to the tokenizer and the model grown to hold them; their ids."""
    if not run.model.add_tokens:
        return []
    if run.lora.trainable_token_indices is not None and run.method != "full":
        raise ConfigError(
            "model.add_tokens sets lora.trainable_token_indices to the added tokens' ids; "
            "leave lora.trainable_token_indices out (or add the tokens yourself and list ids)"
        )
    ids = add_tokens(model, tokenizer, run.model.add_tokens, run.model.add_tokens_special)
    shown = ", ".join(f"{t}={i}" for t, i in zip(run.model.add_tokens, ids, strict=True))
    show(f"added tokens: {shown}; vocabulary {len(tokenizer):,}")
    return ids


def _silent(text: str) -> None:
    """A `show` that prints nothing (ranks other than 0)."""
