"""The training loop: `train`, read top to bottom, and the parts it calls.

`train` sets the run up (`_setup`, which returns the `Run` the loop carries), then for each
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from torch import nn
from torch.nn.utils import clip_grad_norm_

from lorakit.errors import ConfigError, DataError, LorakitError
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
from lorakit.train.rundir import clean_leftovers, storage_error, write_json, write_status
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
from lorakit.train.threads import ThreadGovernor


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


@dataclass(repr=False)
class Run:
    """What the loop carries: its inputs, what `_setup` built from them, and the state that
    changes from step to step."""

    model: nn.Module
    tokenizer: Any
    config: TrainConfig  # with its precision resolved
    output_dir: Path
    device: torch.device
    ctx: Dist
    run_config: dict[str, Any] | None = None  # the CLI's, saved next to the train config
    # built by `_setup`
    plan: StepPlan = field(init=False)
    total_steps: int = field(init=False)
    warmup: int = field(init=False)
    settings: dict[str, Any] = field(init=False)  # what a resume must find unchanged
    optimizer: torch.optim.Optimizer = field(init=False)
    params: list[nn.Parameter] = field(init=False)  # trainable, in the optimizer's order
    scaler: torch.amp.GradScaler = field(init=False)
    result: TrainResult = field(init=False)
    evals: Any = None  # the eval batches; None without eval data
    notes: list[str] = field(default_factory=list)  # shown once the log is open
    resumed_from: Path | None = None
    start_step: int = 0
    governor: ThreadGovernor | None = None
    stop: dict[str, int] = field(default_factory=lambda: {"signal": 0})  # set by a signal
    old_handlers: dict = field(default_factory=dict)
    # while it runs
    best: float = math.inf  # the lowest eval loss so far
    log: RunLog | None = None  # rank 0's, once `_start` opened it

    @property
    def sharded(self) -> bool:
        """True under fsdp: the model's parameters are sharded over the ranks."""
        return self.config.distributed == "fsdp"

    @property
    def has_eval(self) -> bool:
        """True when the run has eval data."""
        return self.evals is not None


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


def _all_finite(model: nn.Module) -> bool:
    """True when every trainable parameter is finite (under fsdp: inside `gathered`)."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)


def _prepare_model(model: nn.Module, config: TrainConfig, device: torch.device) -> None:
    """Move, cast frozen weights, set up checkpointing, switch to train mode.

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
    config, device = _resolve(config or TrainConfig(), model)
    with _process_group(config, device) as ctx:
        run = Run(model, tokenizer, config, Path(output_dir), device, ctx, run_config=run_config)
        _setup(run, train_data, eval_data, resume=resume, force=force, match=resume_settings)
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


# ---------------------------------------------------------------- set-up


def _resolve(config: TrainConfig, model: nn.Module) -> tuple[TrainConfig, torch.device]:
    """The config with its precision resolved, and the device; refuses what cannot run here
    before any process group exists."""
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)  # auto: bf16 only where it is fast
    config = config.model_copy(update={"precision": precision})
    if config.precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision='fp16' needs CUDA; use 'bf16' or 'fp32' on CPU")
    if config.distributed == "fsdp":
        check_shardable(model, precision)
    return config, device


@contextlib.contextmanager
def _process_group(config: TrainConfig, device: torch.device) -> Iterator[Dist]:
    """Where this process sits under torchrun; the group this call joined is left on exit,
    whatever happened."""
    ctx = init_distributed(device, always=config.distributed == "fsdp")
    try:
        yield ctx
    finally:
        if ctx.created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _setup(
    run: Run,
    train_data: Sequence[dict[str, Any]] | Any,
    eval_data: Sequence[dict[str, Any]] | Any | None,
    *,
    resume: str | Path | bool | None,
    force: bool,
    match: dict[str, Any] | None,
) -> None:
    """Plan the steps, check the output directory, prepare (under fsdp: shard) the model, build
    the optimizer, restore the checkpoint to resume from (which must `match` beside the config);
    last, catch the stop signals."""
    config, ctx = run.config, run.ctx
    run.plan = StepPlan(
        train_data, config.batch_size, config.grad_accum_steps, config.seed, config.shuffle
    )
    run.total_steps = config.max_steps or run.plan.total_steps(config.epochs)
    run.warmup = warmup_steps(run.total_steps, config.warmup_steps, config.warmup_ratio)
    run.settings = {  # what a resume must find unchanged
        **config.model_dump(mode="json"),
        "data": run.plan.fingerprint(),
        "world_size": ctx.world_size,
        **(match or {}),
    }
    checkpoint_path = _preflight(run, resume)
    seed_everything(config.seed)
    _prepare_model(run.model, config, run.device)
    if run.sharded:  # after the adapter is attached and cast; the optimizer then holds the shards
        shard_model(run.model, ctx, run.device, config.precision, config.fsdp_cpu_offload)
    run.optimizer, run.params = build_optimizer(run.model, config)
    run.scaler = torch.amp.GradScaler(run.device.type, enabled=config.precision == "fp16")
    run.result = TrainResult(output_dir=run.output_dir, steps=0, total_steps=run.total_steps)
    if checkpoint_path is not None:
        _restore(run, checkpoint_path, auto=resume in ("auto", True), force=force)
    elif ctx.world_size > 1 and not run.sharded:  # every rank starts from rank 0's initial adapter
        import torch.distributed as dist

        for p in run.params:
            dist.broadcast(p.data, src=0)
    reset_peak_memory(run.device)  # memory_mb: the peak since training began
    run.evals = eval_batches(eval_data, config.batch_size)
    run.governor = ThreadGovernor.for_run(run.device, ctx.world_size)  # fewer threads when busy
    run.stop, run.old_handlers = install_stop_signals()


def _preflight(run: Run, resume: str | Path | bool | None) -> Path | None:
    """Before any work: leftovers of killed writers cleaned (rank 0, noted), the checkpoint to
    resume from found, and every rank stopped when rank 0 cannot write the output directory."""
    output_dir, ctx = run.output_dir, run.ctx
    run.notes = _clean_leftovers(output_dir) if ctx.main else []
    checkpoint_path = find_resume(output_dir, resume)
    n_trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    preflight = None
    if ctx.main:
        try:
            check_output_dir(output_dir, 16 * n_trainable * (run.config.keep_checkpoints + 2))
        except ConfigError as err:
            preflight = err
    if all_reduce_sum(torch.tensor(float(preflight is not None)), ctx) > 0:  # all ranks stop
        raise preflight or ConfigError(f"rank 0 cannot write to {output_dir}")
    return checkpoint_path


def _restore(run: Run, checkpoint_path: Path, *, auto: bool, force: bool) -> None:
    """Load a checkpoint into the run; refuses one made with other settings unless `force`."""
    checkpoint_path, saved, skipped = read_resume(checkpoint_path, auto)
    run.notes += skipped
    diffs = resume_differences(saved["state"]["settings"], run.settings)
    if diffs and not force:
        raise ConfigError(
            f"checkpoint {checkpoint_path} was made with other settings: {'; '.join(diffs)}."
            " Resume with the same settings, or pass force=True (--force) to accept them"
        )
    with gathered(run.model, run.optimizer):  # fsdp: loaded whole, then cut into this rank's shards
        state = restore_checkpoint(saved, run.model, run.optimizer)
    if state.get("scaler") and run.scaler.is_enabled():
        run.scaler.load_state_dict(state["scaler"])
    run.start_step = run.result.steps = state["step"]
    run.best = state.get("best_eval_loss") or math.inf
    run.resumed_from = checkpoint_path


def _start(run: Run) -> None:
    """Rank 0 writes the config files and status 'running' and opens the log (with the notes
    and where the run resumed); a fresh run with eval data is evaluated before its first step."""
    if run.ctx.main:
        _write_run_config(run.output_dir, run.config, run.run_config)
        run.log = RunLog(
            run.output_dir, run.config, total_steps=run.total_steps, start_step=run.start_step
        )
        write_status(run.output_dir, "running", step=run.start_step, total_steps=run.total_steps)
        for note in run.notes:
            run.log.message(note)
        if run.resumed_from is not None:
            run.log.message(
                f"resumed from {run.resumed_from} at step {run.start_step}/{run.total_steps}"
            )
    if run.has_eval and run.start_step == 0 and (run.ctx.main or run.sharded):  # "before"
        evaluation = _evaluate(run, 0)
        if run.ctx.main:
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
    loss, tokens, stopping = _forward_backward(run, batches, step, ids)

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
    )


def _forward_backward(
    run: Run, batches: list[dict[str, Any]], step: int, ids: list[Any]
) -> tuple[float, float, bool]:
    """Backward of each micro-batch's summed loss / the supervised tokens of the global batch;
    returns (mean loss, input tokens, stopping) over all ranks. Every rank raises when the
    batch has no supervised token (DataError) or some rank's loss is not finite."""
    # The loss is normalised by the supervised tokens of the whole global batch.
    local = sum(supervised_targets(b["labels"], b.get("position_ids"))[1].numel() for b in batches)
    n_global = int(all_reduce_sum(torch.tensor(float(local)), run.ctx))
    if n_global == 0:
        raise DataError(
            f"step {step + 1}: no supervised token in the batch (every label is -100); "
            f"samples {run.plan.describe(ids)}. Drop fully masked rows"
        )
    loss_total, real_tokens, bad = 0.0, 0, 0
    for batch in batches:
        with autocast(run.config.precision, run.device):
            loss_sum, _ = causal_lm_loss(run.model, batch, run.config.loss_chunk_size)
        bad |= not bool(torch.isfinite(loss_sum))  # all ranks hear of it before raising
        run.scaler.scale(loss_sum / n_global).backward()
        loss_total += float(loss_sum.detach())
        mask = batch.get("attention_mask")
        real_tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
    stats = torch.tensor(
        [loss_total, real_tokens, bad, bool(run.stop["signal"])], dtype=torch.float64
    )
    loss_total, tokens, bad, stopping = all_reduce_sum(stats, run.ctx).tolist()
    loss = loss_total / n_global
    if bad or not math.isfinite(loss):
        raise NonFiniteError(
            f"non-finite loss at step {step + 1}; samples on rank {run.ctx.rank}: "
            f"{run.plan.describe(ids)}. Nothing was saved for this step; lower lr, check "
            "these rows, or use precision='fp32'"
        )
    return loss, tokens, bool(stopping)


# ---------------------------------------------------------------- after the step


def _after_step(run: Run, stats: StepStats) -> None:
    """Rank 0 logs the step; when due, evaluate (keeping the best adapter) and checkpoint; on a
    stop signal, checkpoint and mark the run interrupted."""
    config, ctx, done = run.config, run.ctx, stats.done
    last = done == run.total_steps
    if ctx.main:  # rank 0 logs, evaluates and saves
        run.log.log(_train_row(run, stats), show=done % config.log_every == 0 or last)
    evaluation = None
    due = run.has_eval and (last or _due(done, config.eval_every))
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
    }


def _evaluate(run: Run, step: int) -> dict[str, Any]:
    """Eval loss and perplexity, plus greedy samples appended to samples.jsonl (under fsdp every
    rank evaluates, since every forward gathers shards, and rank 0 writes)."""
    config, model, device = run.config, run.model, run.device
    metrics = eval_loss(model, run.evals, device, config)
    if run.tokenizer is not None and config.eval_prompts:
        with autocast(config.precision, device):
            samples = generate_samples(
                model, run.tokenizer, config.eval_prompts, config.eval_max_new_tokens, device
            )
        if run.ctx.main:
            append_samples(run.output_dir / "samples.jsonl", step, samples)
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
