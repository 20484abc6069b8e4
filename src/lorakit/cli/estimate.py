"""`lorakit estimate`: the memory per rank a run config needs, as a table."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer


def register_estimate(app: typer.Typer) -> None:
    """Add the `estimate` command to the app."""
    app.command()(estimate)


def estimate(
    config: Annotated[Path, typer.Argument(metavar="CONFIG", help="Run config (YAML).")],
    overrides: Annotated[
        list[str] | None, typer.Argument(metavar="OVERRIDES", help="key.path=value overrides.")
    ] = None,
    world_size: Annotated[
        int | None,
        typer.Option(min=1, help="Processes (torchrun's nnodes x nproc_per_node); default: 1."),
    ] = None,
) -> None:
    """Predict parameter, gradient, optimizer and activation memory per rank (no weights load)."""
    from lorakit.jobs.estimate import estimate_memory
    from lorakit.jobs.run_config import load_run_config

    run = load_run_config(config, overrides)
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    typer.echo(estimate_memory(run, world).table())
