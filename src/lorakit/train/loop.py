"""The training loop: one function, `train`, that reads top to bottom.

Per optimizer step the loss is the mean next-token cross-entropy over every supervised token of
the global batch (all micro-batches of the step, on all ranks): each micro-batch contributes
sum(token losses) / (supervised tokens in the global batch), so accumulation and the number of
processes change nothing but speed. Under torchrun every rank takes its share of the rows of
each micro-batch (train_data.StepPlan), so the global batch is the single-process one; instead
of wrapping the model in DistributedDataParallel (an all-reduce per micro-batch), trainable
gradients are summed with one flat all-reduce per optimizer step (gloo on CPU, NCCL on CUDA).

Exact resume: a checkpoint holds trainable parameters, optimizer, schedule step, data position
and RNG states, and torch's generator is reseeded from (seed, step, rank) at each step, so an
interrupted and resumed run equals an uninterrupted one bit for bit on CPU fp32.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from torch import nn
from torch.nn.utils import clip_grad_norm_

from lorakit.errors import ConfigError, DataError, LorakitError
from lorakit.files import write_json
from lorakit.ops import causal_lm_loss, supervised_targets, unwrap_causal_lm
from lorakit.train.checkpoint import (
    find_resume,
    prune_checkpoints,
    read_resume,
    restore_checkpoint,
    resume_differences,
    save_checkpoint,
    save_final,
)
from lorakit.train.config import TrainConfig
from lorakit.train.evaluate import append_samples, eval_loss, generate_samples, move_batch
from lorakit.train.fsdp import check_micro_batches, check_shardable, gathered, shard_model
from lorakit.train.log import RunLog, read_metrics
from lorakit.train.optim import build_optimizer, lr_factor, set_lr, warmup_steps
from lorakit.train.plan import StepPlan, eval_batches, sample_ids
from lorakit.train.plots import plot_run
from lorakit.train.rundir import clean_leftovers, storage_error, write_status
from lorakit.train.runtime import (
    Dist,
    all_reduce_grads,
    all_reduce_sum,
    autocast,
    cast_frozen,
    check_output_dir,
    init_distributed,
    install_stop_signals,
    peak_memory_mb,
    reset_peak_memory,
    resolve_device,
    resolve_precision,
    restore_signals,
    seed_everything,
    step_seed,
)
from lorakit.train.threads import FIXED_THREADS_ENV, ThreadGovernor

# Sections of the CLI's run config that do not change the result (train is compared field by
# field, with its own exceptions).
RUN_FREE = {"train", "eval", "output_dir"}


class NonFiniteError(LorakitError, FloatingPointError):
    """The loss or the gradient became NaN or infinite; the run stopped without saving it."""


@dataclass
class TrainResult:
    """What a finished (or interrupted) run produced."""

    output_dir: Path
    steps: int
    total_steps: int
    interrupted: bool = False
    stop_signal: int | None = None  # the signal that stopped an interrupted run
    final_dir: Path | None = None
    best_dir: Path | None = None
    best_eval_loss: float | None = None
    checkpoint: Path | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def losses(self) -> list[float]:
        """Train loss of every step, in order (including steps before a resume)."""
        return [r["loss"] for r in self.history if r.get("kind", "train") == "train"]


def _all_finite(model: nn.Module) -> bool:
    """True when every trainable parameter is finite (under fsdp: inside `gathered`)."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)


def _prepare_model(model: nn.Module, config: TrainConfig, device: torch.device) -> list:
    """Move, cast frozen weights, set up checkpointing; return the trainable parameters.

    Under fsdp the model stays where it was loaded: `fully_shard` moves each rank's shards to
    the device (or keeps them in CPU memory with fsdp_cpu_offload), so no device ever holds
    the whole base."""
    if config.distributed != "fsdp":
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


def _write_run_config(output_dir: Path, config: TrainConfig, run_config: dict | None) -> None:
    """config.json: the run config with the train settings as used; config.yaml: the run
    config as given (the CLI's), which `lorakit train` runs again."""
    write_json(
        output_dir / "config.json", {**(run_config or {}), "train": config.model_dump(mode="json")}
    )
    if run_config is not None:
        text = yaml.safe_dump(run_config, sort_keys=False, allow_unicode=True)
        with open(output_dir / "config.yaml", "w", encoding="utf-8") as f:
            f.write(text)


def _clean_leftovers(output_dir: Path) -> list[str]:
    """Leftovers of killed writers in the run directory and its checkpoints, cleaned."""
    try:
        return clean_leftovers(output_dir) + clean_leftovers(output_dir / "checkpoints")
    except OSError as err:
        failure = storage_error(err, output_dir)
        if failure is None:
            raise
        raise failure from err


def _record_failure(log: RunLog | None, output_dir: Path, err: BaseException) -> None:
    """status.json for a run that raised (rank 0, once its log exists): a second Ctrl-C is an
    interruption, anything else a failure."""
    if log is None:
        return
    status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
    with contextlib.suppress(OSError):  # the disk may be what failed
        write_status(output_dir, status, error=f"{type(err).__name__}: {err}")


def _due(step: int, every: int | None) -> bool:
    """True when a periodic action (every N steps) falls on `step`."""
    return bool(every) and step % every == 0


def _save_state(
    output_dir: Path, model: nn.Module, optimizer, scaler, state: dict, config: TrainConfig
) -> Path:
    """Checkpoint after state['data_position']['step'] optimizer steps; prune old ones."""
    root = output_dir / "checkpoints"
    step = state["data_position"]["step"]
    scaler_state = scaler.state_dict() if scaler.is_enabled() else None
    path = save_checkpoint(
        root / f"step-{step:08d}",
        model,
        optimizer,
        dict(state, step=step, scaler=scaler_state),
        model_files=hasattr(model, "peft_config"),  # else trainable.safetensors is the model
    )
    prune_checkpoints(root, config.keep_checkpoints)
    return path


def _evaluate(
    model,
    tokenizer,
    eval_data,
    config: TrainConfig,
    device,
    step: int,
    output_dir: Path,
    write: bool = True,
) -> dict[str, Any]:
    """Eval loss and perplexity, plus greedy samples appended to samples.jsonl (when `write`;
    under fsdp every rank evaluates, since every forward gathers shards, and rank 0 writes)."""
    metrics = eval_loss(
        model, eval_data, device, config.precision, config.loss_chunk_size, config.eval_max_batches
    )
    if tokenizer is not None and config.eval_prompts:
        with autocast(config.precision, device):
            samples = generate_samples(
                model, tokenizer, config.eval_prompts, config.eval_max_new_tokens, device
            )
        if write:
            append_samples(output_dir / "samples.jsonl", step, samples)
    return {"kind": "eval", "step": step, **metrics}


def train(
    model: nn.Module,
    tokenizer: Any,
    train_data: Sequence[dict[str, Any]] | Any,
    eval_data: Sequence[dict[str, Any]] | Any | None,
    config: TrainConfig | None,
    output_dir: str | Path,
    *,
    resume: str | Path | bool | None = None,
    force: bool = False,
    run_config: dict[str, Any] | None = None,
) -> TrainResult:
    """Train `model` (a LoraModel, or a model with trainable parameters) on batches.

    train_data / eval_data: a `lorakit.data.TokenizedDataset` (batched by config.batch_size),
    or a sequence of collated batches (dicts with input_ids, labels, optional position_ids,
    attention_mask, sample_ids). resume: None (fresh run; refuses a directory that holds
    files the run writes), 'auto' (the newest checkpoint that reads back whole, if any) or a
    checkpoint path. force: resume even when result-changing settings differ. run_config: the
    full resolved run config to save next to the train config (the CLI's).

    SIGINT or SIGTERM checkpoints the step in progress and returns with `interrupted` set; a
    second one stops at once (runtime.Interrupted). A full disk or read-only directory raises
    StorageError, with nothing half-written left.
    """
    config = config or TrainConfig()
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)  # auto: bf16 only where it is fast
    config = config.model_copy(update={"precision": precision})
    if config.precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision='fp16' needs CUDA; use 'bf16' or 'fp32' on CPU")
    if config.distributed == "fsdp":  # refused before any process group exists
        check_shardable(model, precision)
    ctx = init_distributed(device, always=config.distributed == "fsdp")
    try:
        return _run(
            model, tokenizer, train_data, eval_data, config, Path(output_dir), device, ctx,
            resume=resume, force=force, run_config=run_config,
        )  # fmt: skip
    finally:  # the group this call joined is left, whatever happened
        if ctx.created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(
    model: nn.Module,
    tokenizer: Any,
    train_data: Sequence[dict[str, Any]] | Any,
    eval_data: Sequence[dict[str, Any]] | Any | None,
    config: TrainConfig,
    output_dir: Path,
    device: torch.device,
    ctx: Dist,
    *,
    resume: str | Path | bool | None,
    force: bool,
    run_config: dict[str, Any] | None,
) -> TrainResult:
    """The loop of `train`, on the resolved config, inside the process group `train` joined."""
    plan = StepPlan(
        train_data, config.batch_size, config.grad_accum_steps, config.seed, config.shuffle
    )
    total_steps = config.max_steps or plan.total_steps(config.epochs)
    warmup = warmup_steps(total_steps, config.warmup_steps, config.warmup_ratio)
    settings = {
        **config.model_dump(mode="json"),
        "data": plan.fingerprint(),
        "world_size": ctx.world_size,
        **{f"run.{k}": v for k, v in (run_config or {}).items() if k not in RUN_FREE},
    }

    # Preflight: fail on an unwritable directory before any work; then build the state.
    notes = _clean_leftovers(output_dir) if ctx.main else []
    checkpoint_path = find_resume(output_dir, resume)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    preflight = None
    if ctx.main:
        try:
            check_output_dir(output_dir, 16 * n_trainable * (config.keep_checkpoints + 2))
        except ConfigError as err:
            preflight = err
    if all_reduce_sum(torch.tensor(float(preflight is not None)), ctx) > 0:  # all ranks stop
        raise preflight or ConfigError(f"rank 0 cannot write to {output_dir}")
    seed_everything(config.seed)
    params = _prepare_model(model, config, device)
    sharded = config.distributed == "fsdp"
    if sharded:  # after the adapter is attached and cast; the optimizer then holds the shards
        shard_model(model, ctx, device, config.precision, config.fsdp_cpu_offload)
    optimizer, params = build_optimizer(
        model, config.lr, config.weight_decay, config.betas, config.eps, config.lora_b_lr,
        config.optimizer,
    )  # fmt: skip
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    start_step, best = 0, math.inf
    if checkpoint_path is not None:
        checkpoint_path, saved, skipped = read_resume(checkpoint_path, resume in ("auto", True))
        notes += skipped
        diffs = resume_differences(saved["state"]["settings"], settings)
        if diffs and not force:
            raise ConfigError(
                f"checkpoint {checkpoint_path} was made with other settings: {'; '.join(diffs)}."
                " Resume with the same settings, or pass force=True (--force) to accept them"
            )
        with gathered(model, optimizer):  # fsdp: loaded whole, then cut into this rank's shards
            state = restore_checkpoint(saved, model, optimizer)
        if state.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        start_step, best = state["step"], state.get("best_eval_loss") or math.inf
    elif ctx.world_size > 1 and not sharded:  # every rank starts from rank 0's initial adapter
        import torch.distributed as dist

        for p in params:
            dist.broadcast(p.data, src=0)

    log = None
    stop, old_handlers = install_stop_signals()
    reset_peak_memory(device)  # memory_mb: the peak since training began
    result = TrainResult(output_dir=output_dir, steps=start_step, total_steps=total_steps)
    evals = eval_batches(eval_data, config.batch_size)
    governor = ThreadGovernor.for_run(device, ctx.world_size)  # fewer threads on a busy CPU

    try:
        if ctx.main:
            _write_run_config(output_dir, config, run_config)
            log = RunLog(output_dir, total_steps, start_step, config.progress, config.tensorboard)
            write_status(output_dir, "running", step=start_step, total_steps=total_steps)
            for note in notes:
                log.message(note)
            if checkpoint_path is not None:
                log.message(f"resumed from {checkpoint_path} at step {start_step}/{total_steps}")
        if eval_data is not None and start_step == 0 and (ctx.main or sharded):  # "before"
            evaluation = _evaluate(model, tokenizer, evals, config, device, 0, output_dir, ctx.main)
            if ctx.main:
                log.log(evaluation)
        for step in range(start_step, total_steps):
            t0, c0 = time.perf_counter(), time.process_time()
            step_seed(config.seed, step, ctx.rank)  # dropout masks depend on (seed, step, rank)
            batches = plan.rank_batches(step, ctx)
            ids = sample_ids(batches)
            batches = [move_batch(b, device) for b in batches]
            if sharded:  # every rank must run as many forward passes (each one gathers)
                check_micro_batches(len(batches), ctx, step)
            # The loss is normalised by the supervised tokens of the whole global batch.
            local = sum(
                supervised_targets(b["labels"], b.get("position_ids"))[1].numel() for b in batches
            )
            n_global = int(all_reduce_sum(torch.tensor(float(local)), ctx))
            if n_global == 0:
                raise DataError(
                    f"step {step + 1}: no supervised token in the batch (every label is -100); "
                    f"samples {plan.describe(ids)}. Drop fully masked rows"
                )

            loss_total, real_tokens, bad = 0.0, 0, 0
            for batch in batches:
                with autocast(config.precision, device):
                    loss_sum, _ = causal_lm_loss(model, batch, config.loss_chunk_size)
                bad |= not bool(torch.isfinite(loss_sum))  # all ranks hear of it before raising
                scaler.scale(loss_sum / n_global).backward()
                loss_total += float(loss_sum.detach())
                mask = batch.get("attention_mask")
                real_tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            stats = torch.tensor(
                [loss_total, real_tokens, bad, bool(stop["signal"])], dtype=torch.float64
            )
            loss_total, tokens, bad, stopping = all_reduce_sum(stats, ctx).tolist()
            loss = loss_total / n_global
            if bad or not math.isfinite(loss):
                raise NonFiniteError(
                    f"non-finite loss at step {step + 1}; samples on rank {ctx.rank}: "
                    f"{plan.describe(ids)}. Nothing was saved for this step; lower lr, check "
                    "these rows, or use precision='fp32'"
                )

            if not sharded:  # fsdp has reduce-scattered (summed) them in backward
                all_reduce_grads(params, ctx)  # sum over ranks, once per step
            scaler.unscale_(optimizer)
            grad_norm = float(clip_grad_norm_(params, config.max_grad_norm or math.inf))
            if not math.isfinite(grad_norm) and not scaler.is_enabled():  # fp16: scaler skips
                raise NonFiniteError(
                    f"non-finite gradient norm at step {step + 1}; samples on rank {ctx.rank}: "
                    f"{plan.describe(ids)}. Lower lr or set max_grad_norm"
                )
            factor = lr_factor(step, total_steps, warmup, config.scheduler, config.min_lr_ratio)
            lr = set_lr(optimizer, factor)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            result.steps = done = step + 1
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
            threads = torch.get_num_threads()  # what this step ran on
            switched = governor.update() if governor is not None else None
            if switched is not None and ctx.main:
                log.message(_threads_note(*switched, governor.full))

            last = done == total_steps
            if ctx.main:  # rank 0 logs, evaluates and saves
                log.log(
                    {
                        "kind": "train",
                        "step": done,
                        "epoch": plan.locate(step)[0],
                        "loss": loss,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "tokens": int(tokens),
                        "tokens_per_s": tokens / elapsed,
                        "step_s": elapsed,
                        "cpu_s": cpu,
                        "threads": threads,
                        "memory_mb": peak_memory_mb(device),
                    },  # fmt: skip
                    show=done % config.log_every == 0 or done == total_steps,
                )
            evaluation = None
            due = eval_data is not None and (last or _due(done, config.eval_every))
            if due and (ctx.main or sharded):  # fsdp: every rank runs the forward passes
                evaluation = _evaluate(
                    model, tokenizer, evals, config, device, done, output_dir, ctx.main
                )
            save = last or stopping or _due(done, config.save_every)
            with gathered(model, optimizer) if (evaluation or save) else contextlib.nullcontext():
                if ctx.main and evaluation is not None:
                    log.log(evaluation)
                    if evaluation["eval_loss"] < best and _all_finite(model):
                        best = evaluation["eval_loss"]
                        result.best_dir = save_final(
                            output_dir / "best", model, extra={"eval.json": evaluation}
                        )
                if ctx.main and save:
                    if not _all_finite(model):
                        raise NonFiniteError(f"parameters are not finite after step {done}")
                    epoch, index = plan.locate(done)  # where the next step starts
                    position = {"epoch": epoch, "batch_index": index, "step": done}
                    state = {"settings": settings, "data_position": position,
                             "best_eval_loss": best if math.isfinite(best) else None}  # fmt: skip
                    result.checkpoint = _save_state(
                        output_dir, model, optimizer, scaler, state, config
                    )
            if stopping:  # SIGINT / SIGTERM: the checkpoint above is written; stop cleanly
                result.interrupted, result.stop_signal = True, stop["signal"] or None
                if log is not None:
                    log.message(
                        f"interrupted: checkpoint saved at step {done}/{total_steps}; "
                        "resume='auto' (--resume auto) continues"
                    )
                break

        with gathered(model):
            if ctx.main and not _all_finite(model):
                raise NonFiniteError("trained parameters are not finite; nothing final was saved")
            if ctx.main and not result.interrupted:
                result.final_dir = save_final(output_dir / "final", model)
        if ctx.main:
            result.history = read_metrics(output_dir / "metrics.jsonl")
            if config.plots:
                plot_run(result.history, output_dir / "plots")
            ended = "interrupted" if result.interrupted else "finished"
            write_status(output_dir, ended, step=result.steps, total_steps=total_steps)
    except (OSError, SafetensorError) as err:
        failure = storage_error(err, output_dir)
        if failure is None:
            _record_failure(log, output_dir, err)
            raise
        _record_failure(log, output_dir, failure)
        raise failure from err
    except BaseException as err:
        _record_failure(log, output_dir, err)
        raise
    finally:
        restore_signals(old_handlers)
        if governor is not None:
            governor.restore()
        if log is not None:
            log.close()
    result.best_eval_loss = best if math.isfinite(best) else None
    if result.best_dir is None and (output_dir / "best").is_dir():
        result.best_dir = output_dir / "best"
    return result


def _threads_note(threads: int, others: float, full: int) -> str:
    if threads < full:
        return (
            f"other work is using {others:.1f} of this process's CPUs: training on {threads} "
            f"thread(s) instead of {full} until it stops ({FIXED_THREADS_ENV}=1 keeps {full})"
        )
    return f"the CPUs are free again: training on {threads} threads"
