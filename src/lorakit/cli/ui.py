"""`lorakit ui`: a web page to watch runs, chat with adapters and compare them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorakit.errors import LorakitError


def register_ui(app: typer.Typer) -> None:
    """Add the `ui` command to the app."""
    app.command()(ui)


def ui(
    runs: Annotated[
        Path | None, typer.Option(help="Folder of run and sweep folders to show (e.g. runs/).")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Base model to chat with: folder, hub id or built-in alias.")
    ] = None,
    adapter: Annotated[
        list[str] | None, typer.Option(help="Adapter dir or name=dir; repeat to serve several.")
    ] = None,
    adapters_root: Annotated[
        Path | None, typer.Option(help="Folder the page may load more adapters from.")
    ] = None,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 7860,
    api_key: Annotated[
        str | None, typer.Option(help="Require this bearer key (or set LORAKIT_API_KEY).")
    ] = None,
    allow_insecure_bind: Annotated[
        bool, typer.Option(help="Listen on a non-loopback address without an API key.")
    ] = False,
    max_batch: Annotated[int, typer.Option(min=1, help="Sequences decoded together.")] = 8,
    max_model_len: Annotated[int | None, typer.Option(help="Context limit in tokens.")] = None,
    dtype: Annotated[str, typer.Option()] = "float32",
    device: Annotated[str, typer.Option()] = "cpu",
) -> None:
    """Serve a web page (runs with live curves, chat, side-by-side compare) and the OpenAI API."""
    from lorakit.ui.routes import ui_main

    try:
        ui_main(
            runs,
            model,
            list(adapter or []),
            adapters_root=adapters_root,
            host=host,
            port=port,
            api_key=api_key,
            allow_insecure_bind=allow_insecure_bind,
            max_batch=max_batch,
            max_model_len=max_model_len,
            dtype=dtype,
            device=device,
        )
    except ImportError as missing:  # the serve extra is not installed
        raise LorakitError(str(missing)) from None
