"""`lorakit sweep`: train a base config's variants one after another and report on them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register_sweep(app: typer.Typer) -> None:
    """Add the `sweep` command to the app."""
    app.command()(sweep)


def sweep(
    config: Annotated[Path, typer.Argument(metavar="SWEEP", help="Sweep file (YAML).")],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="OVERRIDES",
            help="key.path=value overrides of the base config, e.g. train.max_steps=20",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(help="Continue a sweep folder: skip finished variants, resume the rest."),
    ] = False,
    only: Annotated[
        str | None, typer.Option(help="Run only these variants (comma-separated names).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option(help="Validate and list the variants; train nothing.")
    ] = False,
) -> None:
    """Train every variant of SWEEP (validated first), then write results.csv and report.md."""
    from lorakit.jobs.sweep import plan_sweep, run_sweep

    plan = plan_sweep(config, overrides)
    typer.echo(f"{config}: {len(plan.variants)} variants into {plan.output_dir}")
    if dry_run:
        for variant in plan.variants:
            typer.echo(f"  {variant.name}: {variant.overrides}")
        return
    names = [n.strip() for n in only.split(",") if n.strip()] if only else None
    result = run_sweep(plan, resume=resume, only=names, show=typer.echo)
    if result.interrupted:
        raise typer.Exit(130)
