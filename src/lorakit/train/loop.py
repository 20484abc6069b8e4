"""The training loop: `train`, read top to bottom, and the parts it calls.

`train` sets the run up (`setup.setup_run` fills the `Run` the loop carries), then for each
optimizer step runs `_optimizer_step` and `_after_step` (log; once in a while eval, best adapter
and checkpoint; stop on a signal), and ends with `_finish` (final adapter, plots, status).

Per optimizer step the loss is the mean next-token cross-entropy over every supervised token of
the global batch (all micro-batches of the step, on all ranks): each micro-batch contributes
sum(token losses) / (supervised tokens in the global batch), so accumulation and the number of
processes change nothing but speed. Under torchrun every rank takes its share of the rows of
each micro-batch (`plan.StepPlan`), so the global batch is the single-process one; instead
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn
from torch.nn.utils import clip_grad_norm_

from lorakit.errors import DataError, LorakitError
from lorakit.ops import supervised_targets
from lorakit.train.checkpoint import prune_checkpoints, save_checkpoint, save_final
from lorakit.train.config import TrainConfig
from lorakit.train.evaluate import append_samples, eval_loss, generate_samples, move_batch
from lorakit.train.fsdp import check_micro_batches, gathered
from lorakit.train.log import RunLog, read_metrics
from lorakit.train.optim import lr_factor, set_lr
from lorakit.train.plan import sample_ids
from lorakit.train.plots import plot_run
from lorakit.train.preference import (
    METRICS,
    batch_sizes,
    combine,
    pair_losses,
    preference_eval,
)
from lorakit.train.router import micro_batch_loss
from lorakit.train.rundir import storage_error, write_status
from lorakit.train.runtime import (
    all_reduce_grads,
    all_reduce_sum,
    autocast,
    peak_memory_mb,
    restore_signals,
    step_seed,
)
from lorakit.train.setup import (
    Run,
    TrainResult,
    process_group,
    resolve_config,
    setup_run,
    write_run_config,
)


class NonFiniteError(LorakitError, FloatingPointError):
    """The loss or the gradient became NaN or infinite; the run stopped without saving it."""


@dataclass
class StepStats:
    """What one optimizer step measured (summed over ranks where it says)."""

    done: int  # optimizer steps done, this one included
    loss: float  # mean over the supervised tokens of the global batch
    lr: float
    grad_norm: float
    tokens: float  # input tokens of the global batch
    elapsed: float  # seconds
    cpu: float  # this process's CPU seconds
    threads: int  # torch threads the step ran on
    stopping: bool  # a stop signal reached some rank
    metrics: dict[str, float]  # the method's own (preference: rewards, log-probs), over ranks


def _all_finite(model: nn.Module) -> bool:
    """True when every trainable parameter is finite (under fsdp: inside `gathered`)."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)


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
    resume_settings: dict[str, Any] | None = None,
) -> TrainResult:
    """Train `model` (a LoraModel, or a model with trainable parameters) on batches.

    train_data / eval_data: a `lorakit.data.TokenizedDataset` (batched by config.batch_size),
    or a sequence of collated batches (dicts with input_ids, labels, optional position_ids,
    attention_mask, sample_ids). resume: None (fresh run; refuses a directory that holds
    files the run writes), 'auto' (the newest checkpoint that reads back whole, if any) or a
    checkpoint path. force: resume even when result-changing settings differ. run_config: the
    full resolved run config to save next to the train config (the CLI's). resume_settings:
    further settings a resume must find unchanged, beside config's (the CLI's other sections).

    SIGINT or SIGTERM checkpoints the step in progress and returns with `interrupted` set; a
    second one stops at once (runtime.Interrupted). A full disk or read-only directory raises
    StorageError, with nothing half-written left.
    """
    config, device = resolve_config(config or TrainConfig(), model)
    with process_group(config, device) as ctx:
        run = Run(model, tokenizer, config, Path(output_dir), device, ctx, run_config=run_config)
        setup_run(run, train_data, eval_data, resume=resume, force=force, match=resume_settings)
        try:
            _start(run)  # config files, the log, status 'running', the eval loss before training
            for step in range(run.start_step, run.total_steps):
                # ---- one optimizer step
                stats = _optimizer_step(run, step)
                # ---- after it: log; once in a while eval and checkpoint; a signal stops here
                _after_step(run, stats)
                if stats.stopping:
                    break
            _finish(run)  # final adapter, metrics history, plots, status 'finished'
        except (OSError, SafetensorError) as err:
            failure = storage_error(err, run.output_dir)
            _record_failure(run.log, run.output_dir, err if failure is None else failure)
            if failure is None:
                raise
            raise failure from err
        except BaseException as err:
            _record_failure(run.log, run.output_dir, err)
            raise
        finally:
            restore_signals(run.old_handlers)
            if run.governor is not None:
                run.governor.restore()
            if run.log is not None:
                run.log.close()
    return run.result


# ---------------------------------------------------------------- the start


def _start(run: Run) -> None:
    """Rank 0 writes status 'running' and the config files and opens the log (with the notes
    and where the run resumed); a fresh run with eval data is evaluated before its first step."""
    if run.ctx.main:  # status.json first: a run's other files never stand without it
        write_status(run.output_dir, "running", step=run.start_step, total_steps=run.total_steps)
        write_run_config(run.output_dir, run.config, run.run_config)
        run.log = RunLog(
            run.output_dir, run.config, total_steps=run.total_steps, start_step=run.start_step
        )
        for note in run.notes:
            run.log.message(note)
        if run.resumed_from is not None:
            run.log.message(
                f"resumed from {run.resumed_from} at step {run.start_step}/{run.total_steps}"
            )
    if run.start_step == 0 and (run.ctx.main or run.sharded):  # "before"
        evaluation = _evaluate(run, 0)
        if run.ctx.main and evaluation is not None:
            run.log.log(evaluation)


# ---------------------------------------------------------------- one optimizer step


def _optimizer_step(run: Run, step: int) -> StepStats:
    """Optimizer step `step` (from 0): this rank's micro-batches forward and backward, gradients
    summed over ranks, clipped, the scheduled lr, the update. Raises before the update when the
    loss or the gradient norm is not finite."""
    config, ctx, scaler, optimizer = run.config, run.ctx, run.scaler, run.optimizer
    t0, c0 = time.perf_counter(), time.process_time()
    step_seed(config.seed, step, ctx.rank)  # dropout masks depend on (seed, step, rank)
    batches = run.plan.rank_batches(step, ctx)
    ids = sample_ids(batches)
    batches = [move_batch(b, run.device) for b in batches]
    if run.sharded:  # every rank must run as many forward passes (each one gathers)
        check_micro_batches(len(batches), ctx, step)
    loss, tokens, stopping, metrics = _forward_backward(run, batches, step, ids)

    if not run.sharded:  # fsdp has reduce-scattered (summed) them in backward
        all_reduce_grads(run.params, ctx)  # sum over ranks, once per step
    scaler.unscale_(optimizer)
    grad_norm = float(clip_grad_norm_(run.params, config.max_grad_norm or math.inf))
    if not math.isfinite(grad_norm) and not scaler.is_enabled():  # fp16: scaler skips
        raise NonFiniteError(
            f"non-finite gradient norm at step {step + 1}; samples on rank {ctx.rank}: "
            f"{run.plan.describe(ids)}. Lower lr or set max_grad_norm"
        )
    factor = lr_factor(step, run.total_steps, run.warmup, config.scheduler, config.min_lr_ratio)
    lr = set_lr(optimizer, factor)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    run.result.steps = step + 1
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    threads = torch.get_num_threads()  # what this step ran on
    switched = run.governor.update() if run.governor is not None else None
    if switched is not None and ctx.main:
        run.log.message(run.governor.note(*switched))
    return StepStats(
        done=step + 1,
        loss=loss,
        lr=lr,
        grad_norm=grad_norm,
        tokens=tokens,
        elapsed=elapsed,
        cpu=cpu,
        threads=threads,
        stopping=stopping,
        metrics=metrics,
    )


def _forward_backward(
    run: Run, batches: list[dict[str, Any]], step: int, ids: list[Any]
) -> tuple[float, float, bool, dict[str, float]]:
    """Backward of each micro-batch's share of the global batch's loss; returns (mean loss,
    input tokens, stopping, other metrics) over all ranks. Every rank raises when the batch
    has nothing to train on (DataError) or some rank's loss is not finite."""
    if run.config.preference is not None:
        totals, metrics = _preference_backward(run, batches, step, ids)
    else:
        totals, metrics = _sft_backward(run, batches, step, ids)
    loss, tokens, bad, stopping = totals
    if bad or not math.isfinite(loss):
        raise NonFiniteError(
            f"non-finite loss at step {step + 1}; samples on rank {run.ctx.rank}: "
            f"{run.plan.describe(ids)}. Nothing was saved for this step; lower lr, check "
            "these rows, or use precision='fp32'"
        )
    return loss, tokens, bool(stopping), metrics


def _global_count(run: Run, local: float, step: int, ids: list[Any], what: str) -> int:
    """A count summed over ranks; DataError when it is zero (the loss would be undefined)."""
    total = int(all_reduce_sum(torch.tensor(float(local)), run.ctx))
    if total == 0:
        raise DataError(
            f"step {step + 1}: no {what} in the batch; samples {run.plan.describe(ids)}. "
            "Drop fully masked rows"
        )
    return total


def _totals(run: Run, loss_total: float, batches: list[dict[str, Any]], bad: int) -> list[float]:
    """[loss, input tokens, bad, stopping] summed over ranks."""
    real_tokens = 0
    for batch in batches:
        mask = batch.get("attention_mask")
        real_tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
    stats = torch.tensor(
        [loss_total, real_tokens, bad, bool(run.stop["signal"])], dtype=torch.float64
    )
    return all_reduce_sum(stats, run.ctx).tolist()


def _sft_backward(
    run: Run, batches: list[dict[str, Any]], step: int, ids: list[Any]
) -> tuple[list, dict[str, float]]:
    """Each micro-batch's summed token loss / the supervised tokens of the global batch, plus
    its share of the MoE router balance term (`train.router`); the metrics hold that term's
    token-weighted mean where the model has one."""
    local = sum(supervised_targets(b["labels"], b.get("position_ids"))[1].numel() for b in batches)
    what = "supervised token (every label is -100)"
    n_global = _global_count(run, local, step, ids, what)
    loss_total, aux_total, bad = 0.0, 0.0, 0
    for batch in batches:
        with autocast(run.config.precision, run.device), _compiled(run):
            objective, loss_sum, aux, n = micro_batch_loss(
                run.model, batch, run.config.loss_chunk_size, n_global, run.router
            )
        bad |= not bool(torch.isfinite(objective))  # all ranks hear of it before raising
        run.scaler.scale(objective).backward()
        loss_total += float(loss_sum.detach())
        aux_total += 0.0 if aux is None else float(aux.detach()) * n / n_global
    totals = _totals(run, loss_total, batches, bad)
    totals[0] /= n_global
    if run.router is None:
        return totals, {}
    aux_mean = all_reduce_sum(torch.tensor(aux_total, dtype=torch.float64), run.ctx)
    return totals, {"aux_loss": float(aux_mean)}


def _compiled(run: Run) -> contextlib.AbstractContextManager:
    """The compiled decoder blocks switched on (train.compile), or nothing."""
    return run.compiled.active() if run.compiled is not None else contextlib.nullcontext()


def _preference_backward(
    run: Run, batches: list[dict[str, Any]], step: int, ids: list[Any]
) -> tuple[list, dict[str, float]]:
    """Each micro-batch's pair losses / the pairs of the global batch (plus the NLL term over
    the chosen answer tokens); the metrics are means over the global batch's pairs."""
    pairs, tokens = batch_sizes(batches, run.config.preference.method)
    n_pairs = _global_count(run, pairs, step, ids, "preference pair")
    n_tokens = int(all_reduce_sum(torch.tensor(float(tokens)), run.ctx))
    loss_total, bad, sums = 0.0, 0, dict.fromkeys(METRICS, 0.0)
    for batch in batches:
        with autocast(run.config.precision, run.device):
            terms = pair_losses(run.model, batch, run.config.preference)
            loss, part = combine(terms, n_pairs, n_tokens)
        bad |= not bool(torch.isfinite(loss))
        run.scaler.scale(loss).backward()
        loss_total += float(loss.detach())
        for name, value in part.items():
            sums[name] += value
    metrics = all_reduce_sum(torch.tensor(list(sums.values()), dtype=torch.float64), run.ctx)
    return _totals(run, loss_total, batches, bad), {
        name: value / n_pairs for name, value in zip(sums, metrics.tolist(), strict=True)
    }


# ---------------------------------------------------------------- after the step


def _after_step(run: Run, stats: StepStats) -> None:
    """Rank 0 logs the step; when due, evaluate (keeping the best adapter) and checkpoint; on a
    stop signal, checkpoint and mark the run interrupted."""
    config, ctx, done = run.config, run.ctx, stats.done
    last = done == run.total_steps
    if ctx.main:  # rank 0 logs, evaluates and saves
        run.log.log(_train_row(run, stats), show=done % config.log_every == 0 or last)
        if run.compiled is not None:
            for line in run.compiled.report(stats.elapsed, last):
                run.log.message(line)
    evaluation = None
    due = (run.has_eval or bool(config.eval_prompts)) and (last or _due(done, config.eval_every))
    if due and (ctx.main or run.sharded):  # fsdp: every rank runs the forward passes
        evaluation = _evaluate(run, done)
    save = last or stats.stopping or _due(done, config.save_every)
    if evaluation is not None or save:
        with gathered(run.model, run.optimizer):
            if ctx.main and evaluation is not None:
                run.log.log(evaluation)
                if evaluation["eval_loss"] < run.best and _all_finite(run.model):
                    run.best = evaluation["eval_loss"]
                    run.result.best_dir = save_final(
                        run.output_dir / "best", run.model, extra={"eval.json": evaluation}
                    )
            if ctx.main and save:
                run.result.checkpoint = _save_checkpoint(run, done)
    if stats.stopping:  # SIGINT / SIGTERM: the checkpoint above is written; stop cleanly
        run.result.interrupted, run.result.stop_signal = True, run.stop["signal"] or None
        if run.log is not None:
            run.log.message(
                f"interrupted: checkpoint saved at step {done}/{run.total_steps}; "
                "resume='auto' (--resume auto) continues"
            )


def _train_row(run: Run, stats: StepStats) -> dict[str, Any]:
    """The metrics.jsonl row of a training step."""
    return {
        "kind": "train",
        "step": stats.done,
        "epoch": run.plan.locate(stats.done - 1)[0],
        "loss": stats.loss,
        "lr": stats.lr,
        "grad_norm": stats.grad_norm,
        "tokens": int(stats.tokens),
        "tokens_per_s": stats.tokens / stats.elapsed,
        "step_s": stats.elapsed,
        "cpu_s": stats.cpu,
        "threads": stats.threads,
        "memory_mb": peak_memory_mb(run.device),
        **stats.metrics,
    }


def _evaluate(run: Run, step: int) -> dict[str, Any] | None:
    """Eval loss and perplexity (None without eval data), and greedy samples of
    train.eval_prompts appended to samples.jsonl and shown (under fsdp every rank evaluates,
    since every forward gathers shards, and rank 0 writes)."""
    config, model, device = run.config, run.model, run.device
    if run.tokenizer is not None and config.eval_prompts:
        with autocast(config.precision, device):
            samples = generate_samples(
                model, run.tokenizer, config.eval_prompts, config.eval_max_new_tokens, device
            )
        if run.ctx.main:
            append_samples(run.output_dir / "samples.jsonl", step, samples)
            for sample in samples:
                run.log.message(
                    f"step {step} sample: {sample['prompt']!r} -> {sample['completion']!r}"
                )
    if not run.has_eval:
        return None
    if config.preference is not None:
        metrics = preference_eval(
            model,
            run.evals,
            config.preference,
            device=device,
            max_batches=config.eval_max_batches,
            autocast=lambda: autocast(config.precision, device),
        )
    else:
        metrics = eval_loss(model, run.evals, device, config)
    return {"kind": "eval", "step": step, **metrics}


def _save_checkpoint(run: Run, done: int) -> Path:
    """Checkpoint after `done` optimizer steps (rank 0, inside `gathered`); prune old ones."""
    if not _all_finite(run.model):
        raise NonFiniteError(f"parameters are not finite after step {done}")
    epoch, index = run.plan.locate(done)  # where the next step starts
    state = {
        "settings": run.settings,
        "data_position": {"epoch": epoch, "batch_index": index, "step": done},
        "best_eval_loss": run.best if math.isfinite(run.best) else None,
        "step": done,
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
    }
    root = run.output_dir / "checkpoints"
    path = save_checkpoint(
        root / f"step-{done:08d}",
        run.model,
        run.optimizer,
        state,
        model_files=hasattr(run.model, "peft_config"),  # else trainable.safetensors is the model
    )
    prune_checkpoints(root, run.config.keep_checkpoints)
    return path


def _finish(run: Run) -> None:
    """The final adapter (unless interrupted), the run's metrics history, plots and status; the
    result's best eval loss and best adapter."""
    with gathered(run.model):
        if run.ctx.main and not _all_finite(run.model):
            raise NonFiniteError("trained parameters are not finite; nothing final was saved")
        if run.ctx.main and not run.result.interrupted:
            run.result.final_dir = save_final(run.output_dir / "final", run.model)
    result = run.result
    if run.ctx.main:
        result.history = read_metrics(run.output_dir / "metrics.jsonl")
        if run.config.plots:
            plot_run(result.history, run.output_dir / "plots")
        ended = "interrupted" if result.interrupted else "finished"
        write_status(run.output_dir, ended, step=result.steps, total_steps=run.total_steps)
    result.best_eval_loss = run.best if math.isfinite(run.best) else None
    if result.best_dir is None and (run.output_dir / "best").is_dir():
        result.best_dir = run.output_dir / "best"
