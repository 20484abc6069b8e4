"""The training loop: one function, `train`, that reads top to bottom.

Per optimizer step the loss is the mean next-token cross-entropy over every supervised token of
the global batch (all micro-batches of the step, on all ranks): each micro-batch contributes
sum(token losses) / (supervised tokens in the global batch), so accumulation and the number of
processes change nothing but speed. `grad_accum_steps` counts micro-batches per optimizer step
across all processes; under torchrun each rank takes every world_size-th of them and gradients
are summed with one all-reduce per step.

Exact resume: a checkpoint holds trainable parameters, optimizer, schedule step, data position
and RNG states, and torch's generator is reseeded from (seed, step, rank) at each step, so an
interrupted and resumed run equals an uninterrupted one bit for bit on CPU fp32.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from lorakit.errors import ConfigError, DataError, LorakitError
from lorakit.evaluate import append_samples, eval_loss, generate_samples, move_batch
from lorakit.ops import causal_lm_loss, supervised_targets, unwrap_causal_lm
from lorakit.plots import plot_run
from lorakit.train_checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    save_final,
    write_json,
)
from lorakit.train_data import data_fingerprint, sample_ids, step_batches
from lorakit.train_log import RunLog, read_metrics
from lorakit.train_optim import build_optimizer, lr_factor, set_lr, warmup_steps
from lorakit.train_runtime import (
    all_reduce_grads,
    all_reduce_sum,
    autocast,
    cast_frozen,
    check_output_dir,
    init_distributed,
    peak_memory_mb,
    resolve_device,
    seed_everything,
    step_seed,
)


class TrainConfig(BaseModel):
    """How to train: optimizer, schedule, precision, evaluation, checkpoints, logging."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, description="Seed for Python, NumPy, torch and the data order.")
    epochs: int = Field(
        1, ge=1, description="Passes over the training data (ignored with max_steps)."
    )
    max_steps: int | None = Field(
        None, ge=1, description="Optimizer steps to run; overrides epochs."
    )
    grad_accum_steps: int = Field(
        1, ge=1, description="Micro-batches per optimizer step, summed over all processes."
    )
    shuffle: bool = Field(True, description="Shuffle the batch order each epoch (seeded).")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate of AdamW.")
    lora_b_lr: float | None = Field(
        None, gt=0, description="Separate learning rate for lora_B matrices (LoRA+); None: lr."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not on biases/norms).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate decay after warmup."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps (wins over warmup_ratio).")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Warmup as a fraction of all steps.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final lr as a fraction of lr.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm; None: off.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "bf16", description="fp32, or bf16/fp16 autocast (fp16 with loss scaling, CUDA only)."
    )
    base_dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Storage of frozen weights; auto: bf16 when precision is bf16."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute decoder activations in backward to save memory."
    )
    loss_chunk_size: int = Field(1024, ge=1, description="Supervised tokens per chunk of the loss.")
    device: str = Field("auto", description="auto, cpu or cuda (torchrun: this rank's GPU).")
    eval_every: int | None = Field(
        None, ge=1, description="Evaluate every N steps (and at the end); None: at the end only."
    )
    eval_max_batches: int | None = Field(None, ge=1, description="Cap on eval batches; None: all.")
    eval_prompts: list[str] = Field(
        default_factory=list, description="Prompts for greedy samples written to samples.jsonl."
    )
    eval_max_new_tokens: int = Field(64, ge=1, description="Tokens generated per sample prompt.")
    save_every: int | None = Field(
        None, ge=1, description="Checkpoint every N steps (and at the end); None: at the end only."
    )
    keep_checkpoints: int = Field(2, ge=1, description="How many newest checkpoints to keep.")
    log_every: int = Field(1, ge=1, description="Print a progress line every N steps.")
    progress: Literal["auto", "rich", "plain", "none"] = Field(
        "auto", description="Progress display; auto: rich on a terminal, plain lines otherwise."
    )
    tensorboard: bool = Field(True, description="Write TensorBoard events when it is installed.")


# Fields that may change between a run and its resume without changing the result.
_RESUME_FREE = {
    "eval_every", "eval_max_batches", "eval_prompts", "eval_max_new_tokens", "save_every",
    "keep_checkpoints", "log_every", "progress", "tensorboard", "device",
}  # fmt: skip


class NonFiniteError(LorakitError, FloatingPointError):
    """The loss or the gradient became NaN or infinite; the run stopped without saving it."""


@dataclass
class TrainResult:
    """What a finished (or interrupted) run produced."""

    output_dir: Path
    steps: int
    total_steps: int
    interrupted: bool = False
    final_dir: Path | None = None
    best_dir: Path | None = None
    best_eval_loss: float | None = None
    checkpoint: Path | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def losses(self) -> list[float]:
        """Train loss of every step, in order (including steps before a resume)."""
        return [r["loss"] for r in self.history if r.get("kind", "train") == "train"]


def _all_finite(params: list[nn.Parameter]) -> bool:
    """True when every trainable parameter is finite."""
    return all(bool(torch.isfinite(p).all()) for p in params)


def _resume_differences(saved: dict, now: dict) -> list[str]:
    """'key: saved -> now' for every result-changing setting that differs."""
    keys = sorted((set(saved) | set(now)) - _RESUME_FREE)
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]


def _find_resume(output_dir: Path, resume: str | Path | bool | None) -> Path | None:
    """The checkpoint to resume from: None, 'auto'/True (newest complete one), or a path."""
    root = output_dir / "checkpoints"
    if resume in (None, False):
        if latest_checkpoint(root) is not None:
            raise ConfigError(
                f"{output_dir} holds checkpoints of an earlier run; pass resume='auto' to "
                "continue it, or choose a new output_dir"
            )
        return None
    if resume in ("auto", True):
        return latest_checkpoint(root)
    return Path(resume)


def _prepare_model(model: nn.Module, config: TrainConfig, device: torch.device) -> list:
    """Move, cast frozen weights, set up checkpointing; return the trainable parameters."""
    model.to(device)
    lm = unwrap_causal_lm(model)
    full = all(p.requires_grad for p in model.parameters())
    base_dtype = config.base_dtype
    if base_dtype == "auto":
        base_dtype = "bf16" if config.precision == "bf16" and not full else "fp32"
    if base_dtype == "bf16":
        if config.precision != "bf16":
            raise ConfigError("base_dtype='bf16' needs precision='bf16' (autocast)")
        cast_frozen(model, torch.bfloat16)
    if config.gradient_checkpointing:
        if not hasattr(lm, "gradient_checkpointing_enable"):
            raise ConfigError("gradient_checkpointing needs a Hugging Face model")
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return [p for p in model.parameters() if p.requires_grad]


def _save_state(
    output_dir: Path, step: int, model: nn.Module, optimizer, scaler, state: dict, keep: int
) -> Path:
    """Checkpoint after `step` completed optimizer steps, then prune old ones."""
    root = output_dir / "checkpoints"
    scaler_state = scaler.state_dict() if scaler is not None and scaler.is_enabled() else None
    path = save_checkpoint(
        root / f"step-{step:08d}",
        model,
        optimizer,
        dict(state, step=step, scaler=scaler_state),
        model_files=hasattr(model, "peft_config"),  # else trainable.safetensors is the model
    )
    prune_checkpoints(root, keep)
    return path


def _evaluate(
    model, tokenizer, eval_data, config: TrainConfig, device, step: int, output_dir: Path
) -> dict[str, Any]:
    """Eval loss and perplexity, plus greedy samples appended to samples.jsonl."""
    metrics = eval_loss(
        model, eval_data, device, config.precision, config.loss_chunk_size, config.eval_max_batches
    )
    if tokenizer is not None and config.eval_prompts:
        with autocast(config.precision, device):
            samples = generate_samples(
                model, tokenizer, config.eval_prompts, config.eval_max_new_tokens, device
            )
        append_samples(output_dir / "samples.jsonl", step, samples)
    return {"kind": "eval", "step": step, **metrics}


def _install_sigint() -> tuple[dict[str, bool], Any]:
    """Turn Ctrl-C into a flag the loop checks after each step; returns (flag, old handler)."""
    flag = {"stop": False}

    def handler(signum, frame):  # noqa: ARG001
        if flag["stop"]:  # a second Ctrl-C: give up at once
            raise KeyboardInterrupt
        flag["stop"] = True

    try:
        old = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: Ctrl-C keeps its default behaviour
        old = None
    return flag, old


def train(
    model: nn.Module,
    tokenizer: Any,
    train_data: Sequence[dict[str, Any]],
    eval_data: Sequence[dict[str, Any]] | None,
    config: TrainConfig | None,
    output_dir: str | Path,
    *,
    resume: str | Path | bool | None = None,
    force: bool = False,
    run_config: dict[str, Any] | None = None,
) -> TrainResult:
    """Train `model` (a LoraModel, or a model with trainable parameters) on batches.

    train_data / eval_data: sequences of collated batches (dicts with input_ids, labels,
    optional position_ids, attention_mask, sample_ids). resume: None (fresh run; refuses a
    directory that already has checkpoints), 'auto' (newest complete checkpoint, if any) or a
    checkpoint path. force: resume even when result-changing settings differ. run_config: the
    full resolved run config to save next to the train config (the CLI's).
    """
    config = config or TrainConfig()
    output_dir = Path(output_dir)
    device = resolve_device(config.device)
    ctx = init_distributed(device)
    if config.grad_accum_steps % ctx.world_size:
        raise ConfigError(
            f"grad_accum_steps={config.grad_accum_steps} is not a multiple of the "
            f"{ctx.world_size} processes; it counts micro-batches per step over all processes"
        )
    if config.precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision='fp16' needs CUDA; use 'bf16' or 'fp32' on CPU")
    if len(train_data) == 0:
        raise DataError("train_data has no batches")
    per_epoch = math.ceil(len(train_data) / config.grad_accum_steps)
    total_steps = config.max_steps or config.epochs * per_epoch
    warmup = warmup_steps(total_steps, config.warmup_steps, config.warmup_ratio)
    settings = {
        **config.model_dump(mode="json"),
        "data": data_fingerprint(train_data),
        "world_size": ctx.world_size,
        **{f"run.{k}": v for k, v in (run_config or {}).items() if k != "train"},
    }

    # Preflight: fail on an unwritable directory before any work; then build the state.
    checkpoint_path = _find_resume(output_dir, resume)
    seed_everything(config.seed)
    params = _prepare_model(model, config, device)
    n_trainable = sum(p.numel() for p in params)
    if ctx.main:
        check_output_dir(output_dir, need_bytes=16 * n_trainable * (config.keep_checkpoints + 2))
    optimizer, params = build_optimizer(
        model, config.lr, config.weight_decay, config.betas, config.eps, config.lora_b_lr
    )
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    start_step, best = 0, {"loss": math.inf}
    if checkpoint_path is not None:
        saved = json.loads((checkpoint_path / "state.json").read_text())
        diffs = _resume_differences(saved["settings"], settings)
        if diffs and not force:
            raise ConfigError(
                f"checkpoint {checkpoint_path} was made with other settings: {'; '.join(diffs)}."
                " Resume with the same settings, or pass force=True (--force) to accept them"
            )
        state = load_checkpoint(checkpoint_path, model, optimizer)
        if state.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        start_step, best["loss"] = state["step"], state.get("best_eval_loss") or math.inf
    elif ctx.world_size > 1:  # every rank starts from rank 0's initial adapter
        import torch.distributed as dist

        for p in params:
            dist.broadcast(p.data, src=0)

    log = None
    if ctx.main:
        write_json(
            output_dir / "config.json",
            {**(run_config or {}), "train": config.model_dump(mode="json")},
        )
        log = RunLog(output_dir, total_steps, start_step, config.progress, config.tensorboard)
        if checkpoint_path is not None:
            log.message(f"resumed from {checkpoint_path} at step {start_step}/{total_steps}")
    stop, old_handler = _install_sigint()
    result = TrainResult(output_dir=output_dir, steps=start_step, total_steps=total_steps)

    try:
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            step_seed(config.seed, step, ctx.rank)
            batches = [
                move_batch(b, device)
                for b in step_batches(
                    train_data, step, config.grad_accum_steps, config.seed, config.shuffle, ctx
                )
            ]
            # Normaliser: supervised tokens of the whole global batch.
            counts = [
                int(supervised_targets(b["labels"], b.get("position_ids"))[1].numel())
                for b in batches
            ]
            n_global = int(all_reduce_sum(torch.tensor(float(sum(counts))), ctx))
            if n_global == 0:
                raise DataError(
                    f"step {step + 1}: no supervised tokens in the batch (every label is -100); "
                    f"sample ids {sample_ids(batches)}. Drop fully masked rows"
                )

            loss_total, real_tokens, bad = 0.0, 0, 0
            for batch in batches:
                with autocast(config.precision, device):
                    loss_sum, _ = causal_lm_loss(model, batch, config.loss_chunk_size)
                if not torch.isfinite(loss_sum):
                    bad = 1  # every rank must hear about it before anyone raises
                scaler.scale(loss_sum / n_global).backward()
                loss_total += float(loss_sum.detach())
                mask = batch.get("attention_mask")
                real_tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            stats = all_reduce_sum(
                torch.tensor(
                    [loss_total, real_tokens, bad, float(stop["stop"])], dtype=torch.float64
                ),
                ctx,
            )
            loss, tokens = float(stats[0]) / n_global, int(stats[1])
            if stats[2] > 0 or not math.isfinite(loss):
                raise NonFiniteError(
                    f"non-finite loss at step {step + 1}; sample ids on rank {ctx.rank}: "
                    f"{sample_ids(batches)}. Nothing was saved for this step; lower lr, check "
                    "these rows, or use precision='fp32'"
                )

            all_reduce_grads(params, ctx)
            scaler.unscale_(optimizer)
            grad_norm = float(
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or math.inf)
            )
            if not math.isfinite(grad_norm) and not scaler.is_enabled():
                raise NonFiniteError(
                    f"non-finite gradient norm at step {step + 1}; sample ids on rank "
                    f"{ctx.rank}: {sample_ids(batches)}. Lower lr or use max_grad_norm"
                )
            lr = set_lr(
                optimizer,
                lr_factor(step, total_steps, warmup, config.scheduler, config.min_lr_ratio),
            )
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            result.steps = step + 1
            elapsed = time.perf_counter() - t0

            if ctx.main:
                row = {
                    "kind": "train", "step": step + 1, "epoch": step // per_epoch, "loss": loss,
                    "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                    "tokens_per_s": tokens / elapsed, "step_s": elapsed,
                    "memory_mb": peak_memory_mb(device),
                }  # fmt: skip
                log.log(row, show=(step + 1) % config.log_every == 0 or step + 1 == total_steps)
                last = step + 1 == total_steps
                due_eval = config.eval_every and (step + 1) % config.eval_every == 0
                if eval_data is not None and (due_eval or last):
                    evaluation = _evaluate(
                        model, tokenizer, eval_data, config, device, step + 1, output_dir
                    )
                    log.log(evaluation)
                    if evaluation["eval_loss"] < best["loss"] and _all_finite(params):
                        best["loss"] = evaluation["eval_loss"]
                        result.best_dir = save_final(output_dir / "best", model)
                        write_json(output_dir / "best" / "eval.json", evaluation)
                due_save = config.save_every and (step + 1) % config.save_every == 0
                if due_save or last or stats[3] > 0:
                    state = {
                        "settings": settings,
                        "epoch": step // per_epoch + (1 if (step + 1) % per_epoch == 0 else 0),
                        "batch_index": ((step + 1) % per_epoch) * config.grad_accum_steps,
                        "total_steps": total_steps,
                        "best_eval_loss": best["loss"] if math.isfinite(best["loss"]) else None,
                    }
                    result.checkpoint = _save_state(
                        output_dir,
                        step + 1,
                        model,
                        optimizer,
                        scaler,
                        state,
                        config.keep_checkpoints,
                    )
            if stats[3] > 0:  # Ctrl-C: the checkpoint above is written; stop cleanly
                result.interrupted = True
                if log is not None:
                    log.message(
                        f"interrupted: checkpoint saved at step {step + 1}; resume='auto' continues"
                    )
                break

        if ctx.main:
            if not _all_finite(params):
                raise NonFiniteError(
                    "trained parameters are not finite; the final adapter was not saved"
                )
            if not result.interrupted:
                result.final_dir = save_final(output_dir / "final", model)
            result.history = read_metrics(output_dir / "metrics.jsonl")
            plot_run(result.history, output_dir / "plots")
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
        if log is not None:
            log.close()
        if ctx.created:
            import torch.distributed as dist

            dist.destroy_process_group()
    result.best_eval_loss = best["loss"] if math.isfinite(best["loss"]) else None
    if result.best_dir is None and (output_dir / "best").is_dir():
        result.best_dir = output_dir / "best"
    return result
