"""The `lorakit` command: each subcommand is a thin shell over the library.

`main(argv)` runs the app in-process and returns the exit code; a `LorakitError` becomes a
one-paragraph message on stderr and exit code 1 (no traceback), a usage error exit code 2, an
interrupt (Ctrl-C, or SIGINT / SIGTERM that stopped a run after its checkpoint) 128 + the
signal's number with the line `interrupted`.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from lorakit.cli.estimate import register_estimate
from lorakit.cli.export import register_export
from lorakit.cli.generate import register_generation
from lorakit.cli.sweep import register_sweep
from lorakit.cli.tools import register_tools
from lorakit.cli.ui import register_ui
from lorakit.errors import LorakitError
from lorakit.version import __version__

INTERRUPTED = {128 + signal.SIGINT, 128 + signal.SIGTERM}
HEAVY = {"train", "quickstart", "eval", "serve", "generate", "chat", "merge", "sweep", "ui"}

app = typer.Typer(
    name="lorakit",
    help="LoRA and QLoRA fine-tuning for Hugging Face causal LMs.\n\n"
    "Start with `lorakit quickstart`; train your own with `lorakit init` and "
    "`lorakit train CONFIG.yaml`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lorakit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """LoRA and QLoRA fine-tuning for Hugging Face causal LMs."""


@app.command()
def train(
    config: Annotated[Path, typer.Argument(metavar="CONFIG", help="Run config (YAML).")],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="OVERRIDES",
            help="key.path=value overrides, e.g. train.lr=1e-4",
        ),
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option(help="'auto': continue the newest complete checkpoint; or a checkpoint dir."),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            help="With --resume: continue even when result-changing settings differ (it does "
            "not start over; --overwrite does)."
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            help="Start over: delete the earlier run's files in output_dir (only a folder a "
            "lorakit run wrote) before training."
        ),
    ] = False,
) -> None:
    """Fine-tune as CONFIG says (validated before any work); writes adapter, metrics, plots."""
    from lorakit.jobs.finetune import run_training
    from lorakit.jobs.run_config import load_run_config
    from lorakit.train.runtime import Interrupted, is_main_process

    run = load_run_config(config, overrides)
    try:
        result = run_training(run, resume=resume, force=force, overwrite=overwrite, show=typer.echo)
    except Interrupted as stopped:  # a second signal: stopped at once
        raise typer.Exit(128 + stopped.signum) from None
    if is_main_process():  # under torchrun, rank 0 reports (errors surface from every rank)
        typer.echo(f"run directory: {result.output_dir}")
    if result.interrupted:  # stopped by a signal after checkpointing: 128 + its number
        raise typer.Exit(128 + (result.stop_signal or signal.SIGINT))


@app.command()
def validate(
    config: Annotated[Path, typer.Argument(metavar="CONFIG", help="Run config (YAML).")],
    overrides: Annotated[
        list[str] | None, typer.Argument(metavar="OVERRIDES", help="key.path=value overrides.")
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option(help="Check as `train --resume` would: 'auto' or a checkpoint dir."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Check as `train --overwrite` would (nothing is deleted).")
    ] = False,
) -> None:
    """Check a run config as `train` does before its first step (every row of the data, the
    output folder, the model path; no model is loaded) and print it fully resolved."""
    import yaml

    from lorakit.jobs.preflight import check_run
    from lorakit.jobs.run_config import load_run_config

    run = load_run_config(config, overrides)
    warnings = check_run(run, resume, overwrite)
    typer.echo(yaml.safe_dump(run.model_dump(mode="json"), sort_keys=False, allow_unicode=True))
    for warning in warnings:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(f"{config}: valid", err=True)


@app.command()
def quickstart(
    output: Annotated[Path, typer.Option(help="Run directory.")] = Path("runs/quickstart"),
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 30,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-3,
    rank: Annotated[int, typer.Option("--rank", "-r", min=1, help="LoRA rank.")] = 16,
    name: Annotated[str, typer.Option(help="The new name to teach.")] = "Lumi",
    author: Annotated[str, typer.Option(help="The new maker to teach.")] = "lorakit",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens per answer.")] = 32,
    precision: Annotated[
        str, typer.Option(help="fp32 (the fastest on most CPUs) or bf16 autocast.")
    ] = "fp32",
    overwrite: Annotated[
        bool, typer.Option(help="Replace an earlier quickstart in the output directory.")
    ] = False,
) -> None:
    """Teach the built-in model a new name in a few minutes on a CPU, and show before/after."""
    from lorakit.jobs.quickstart import QuickstartSettings, run_quickstart

    settings = QuickstartSettings(
        output_dir=output,
        steps=steps,
        lr=lr,
        r=rank,
        lora_alpha=2 * rank,
        name=name,
        author=author,
        max_new_tokens=max_new_tokens,
        precision=precision,
        overwrite=overwrite,
    )
    run_quickstart(settings, show=typer.echo)


register_generation(app)
register_estimate(app)
register_tools(app)
register_export(app)
register_ui(app)
register_sweep(app)


def _heavy(argv: list[str]) -> bool:
    """True when the command will load a model (and --help is not asked for)."""
    if any(a in ("-h", "--help", "--version") for a in argv):
        return False
    first = next((a for a in argv if not a.startswith("-")), None)
    return first in HEAVY


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code. argv=None: sys.argv (and maybe re-exec for speed).

    Ctrl-C at any moment, the start-up's imports included, is the line `interrupted` and 130.
    """
    try:
        return _run(argv)
    except KeyboardInterrupt:  # outside a command (typer turns one inside a command into 130)
        typer.echo("interrupted", err=True)
        return 128 + signal.SIGINT


def _run(argv: list[str] | None) -> int:
    if argv is None:
        argv = sys.argv[1:]
        if _heavy(argv):
            from lorakit.adapter_specs import check_adapter_folders

            try:  # a wrong --adapter path fails before the heavy imports
                check_adapter_folders(argv)
            except LorakitError as error:
                _fail(str(error))
                return 1
            from lorakit.startup import reexec_for_speed

            reexec_for_speed()  # re-execs with tcmalloc and a short OpenMP spin when they help
    argv = list(argv) or ["--help"]  # bare `lorakit`: the overview, exit code 0
    try:
        code = app(args=argv, prog_name="lorakit", standalone_mode=False)
    except LorakitError as error:
        _fail(str(error))
        return 1
    except typer.Exit as done:
        return done.exit_code
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except typer.TyperException as error:  # usage errors: show() prints usage and the reason
        error.show()
        return getattr(error, "exit_code", 2)
    code = code if isinstance(code, int) else 0  # typer returns a command's typer.Exit(n)
    if code in INTERRUPTED:  # Ctrl-C anywhere (typer makes it 130), or a stopped run
        typer.echo("interrupted", err=True)
    return code


def _fail(message: str) -> None:
    """Print a LorakitError as one paragraph (its first lines) prefixed with `error:`."""
    text = message.strip() or "unknown error"
    if os.environ.get("LORAKIT_DEBUG"):
        import traceback

        traceback.print_exc()
    typer.echo(f"error: {text}", err=True)
