"""`lorakit export`: a model (with adapters merged) or an adapter as GGUF for llama.cpp and
Ollama."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorakit.cli.generate import BaseArg


def register_export(app: typer.Typer) -> None:
    app.command()(export)


def export(
    base: BaseArg,
    out: Annotated[Path, typer.Argument(metavar="OUT", help="The .gguf file to write.")],
    adapter: Annotated[
        list[Path] | None,
        typer.Option(help="Adapter directory, merged in order; repeat for several."),
    ] = None,
    adapter_only: Annotated[
        bool,
        typer.Option(
            help="Write the one --adapter as a GGUF LoRA file (llama.cpp --lora, Ollama ADAPTER), "
            "every module's scale folded in."
        ),
    ] = False,
    dtype: Annotated[str, typer.Option(help="f32, f16, bf16 or q8_0.")] = "f32",
    ollama: Annotated[
        Path | None,
        typer.Option(help="Also write this folder: the GGUF file(s) and a Modelfile."),
    ] = None,
    tolerance: Annotated[
        float | None, typer.Option(help="Largest accepted merged-vs-unmerged logit difference.")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing OUT (and --ollama).")
    ] = False,
    device: Annotated[str, typer.Option()] = "cpu",
) -> None:
    """Write BASE, with each --adapter merged (verified first), as one GGUF file for llama.cpp,
    Ollama and LM Studio; or, with --adapter-only, the adapter as a GGUF LoRA file."""
    from lorakit.jobs.export import export_gguf

    report = export_gguf(
        base,
        out,
        list(adapter or []),
        dtype=dtype,
        adapter_only=adapter_only,
        ollama=ollama,
        device=device,
        tolerance=tolerance,
        overwrite=overwrite,
    )
    for line in report.lines():
        typer.echo(line)
