"""A run's set-up: everything it needs before its first step.

`resolve_config` resolves the precision and the device, `process_group` joins (and leaves) the
torchrun group, and `setup_run` fills the `Run` the loop carries: the step plan, the settings a
resume must find unchanged, the output directory checked and its leftovers cleaned, the model
prepared (under fsdp: sharded), the optimizer, the checkpoint restored, the stop signals caught.
`write_run_config` writes config.json and config.yaml once the run starts.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from lorakit.errors import ConfigError
from lorakit.files import write_json, write_text
from lorakit.ops import unwrap_causal_lm
from lorakit.train.checkpoint import (
    find_resume,
    read_resume,
    restore_checkpoint,
    resume_differences,
)
from lorakit.train.compiled import Compiled, decoder_blocks, resolve_compile
from lorakit.train.config import TrainConfig
from lorakit.train.fsdp import check_shardable, gathered, shard_model
from lorakit.train.log import RunLog
from lorakit.train.optim import build_optimizer, warmup_steps
from lorakit.train.plan import StepPlan, eval_batches
from lorakit.train.preference import check_preference_model
from lorakit.train.router import RouterLoss
from lorakit.train.rundir import clean_leftovers, storage_error
from lorakit.train.runtime import (
    Dist,
    all_reduce_sum,
    cast_frozen,
    check_output_dir,
    init_distributed,
    install_stop_signals,
    reset_peak_memory,
    resolve_device,
    resolve_precision,
    seed_everything,
)
from lorakit.train.threads import ThreadGovernor


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
    """What the loop carries: its inputs, what `setup_run` built from them, and the state that
    changes from step to step."""

    model: nn.Module
    tokenizer: Any
    config: TrainConfig  # with its precision resolved
    output_dir: Path
    device: torch.device
    ctx: Dist
    run_config: dict[str, Any] | None = None  # the CLI's, saved next to the train config
    # built by `setup_run`
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
    router: RouterLoss | None = None  # an MoE model's load-balancing loss, when its config asks
    compiled: Compiled | None = None  # the compiled decoder blocks (train.compile)
    stop: dict[str, int] = field(default_factory=lambda: {"signal": 0})  # set by a signal
    old_handlers: dict = field(default_factory=dict)
    # while it runs
    best: float = math.inf  # the lowest eval loss so far
    log: RunLog | None = None  # rank 0's, once the loop opened it

    @property
    def sharded(self) -> bool:
        """True under fsdp: the model's parameters are sharded over the ranks."""
        return self.config.distributed == "fsdp"

    @property
    def has_eval(self) -> bool:
        """True when the run has eval data."""
        return self.evals is not None


def resolve_config(config: TrainConfig, model: nn.Module) -> tuple[TrainConfig, torch.device]:
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
def process_group(config: TrainConfig, device: torch.device) -> Iterator[Dist]:
    """Where this process sits under torchrun; the group this call joined is left on exit,
    whatever happened."""
    ctx = init_distributed(device, always=config.distributed == "fsdp")
    try:
        yield ctx
    finally:
        if ctx.created:
            import torch.distributed as dist

            dist.destroy_process_group()


def setup_run(
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
    if config.preference is not None:
        check_preference_model(run.model, config.preference)
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
    run.router = RouterLoss.of(run.model)
    if run.router is not None:
        run.notes.append(run.router.describe())
    _prepare_model(run.model, config, run.device)
    if run.sharded:  # after the adapter is attached and cast; the optimizer then holds the shards
        shard_model(run.model, ctx, run.device, config.precision, config.fsdp_cpu_offload)
    run.compiled = _compiled(run)
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
    diffs = resume_differences(_saved_settings(run, saved["state"]["settings"]), run.settings)
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


def _saved_settings(run: Run, settings: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's settings, its data fingerprint taken as this run's where it is the
    per-sample one of the same data (a run begun before token stores kept their digest)."""
    data = settings.get("data")
    if data in (None, run.settings["data"]) or data != run.plan.fingerprint(per_sample=True):
        return settings
    return {**settings, "data": run.settings["data"]}


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


def _compiled(run: Run) -> Compiled | None:
    """The compiled decoder blocks when train.compile asks for them (not under fsdp)."""
    config = run.config
    if run.sharded or not resolve_compile(config.compile, run.device):
        return None
    if not decoder_blocks(run.model):
        if config.compile == "auto":
            return None
        name = type(unwrap_causal_lm(run.model)).__name__
        raise ConfigError(
            f"train.compile: {name} names no repeated decoder block (_no_split_modules) to "
            "compile; set train.compile: false"
        )
    compiled = Compiled(run.model)
    run.notes.append(compiled.describe())
    return compiled


def _clean_leftovers(output_dir: Path) -> list[str]:
    """Leftovers of killed writers in the run directory and its checkpoints, cleaned."""
    try:
        return clean_leftovers(output_dir) + clean_leftovers(output_dir / "checkpoints")
    except OSError as err:
        failure = storage_error(err, output_dir)
        if failure is None:
            raise
        raise failure from err


def write_run_config(output_dir: Path, config: TrainConfig, run_config: dict | None) -> None:
    """config.json: the run config with the train settings as used; config.yaml: the run
    config as given (the CLI's), which `lorakit train` runs again."""
    write_json(
        output_dir / "config.json", {**(run_config or {}), "train": config.model_dump(mode="json")}
    )
    if run_config is not None:
        text = yaml.safe_dump(run_config, sort_keys=False, allow_unicode=True)
        write_text(output_dir / "config.yaml", text)
