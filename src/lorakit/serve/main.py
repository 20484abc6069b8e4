"""Putting a server together: the model, its adapters, the engine and the app; `serve_main`."""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lorakit.adapter_specs import parse_adapters
from lorakit.errors import ConfigError
from lorakit.serve.engine import Engine
from lorakit.serve.registry import ModelHost

log = logging.getLogger("lorakit.serve")


def is_loopback(host: str) -> bool:
    """True for 'localhost' and loopback addresses in any spelling the system resolves the same
    way: 127.0.0.0/8 (also '127.1', '0x7f.1', '2130706433'), ::1 and ::ffff:127.x.y.z."""
    host = host.strip().strip("[]").lower()
    if host in ("localhost", "localhost."):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if not re.fullmatch(r"[0-9a-fx.]+", host):
            return False  # a host name: not known to be loopback without asking DNS
        try:  # the short and hexadecimal IPv4 forms getaddrinfo accepts
            address = ipaddress.ip_address(socket.inet_aton(host))
        except OSError:
            return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def check_bind(host: str, api_key: str | None, allow_insecure_bind: bool) -> None:
    """Refuse a non-loopback address without an API key unless explicitly allowed."""
    if is_loopback(host) or api_key or allow_insecure_bind:
        return
    raise ConfigError(
        f"refusing to listen on {host!r} without an API key: anyone who can reach it could use "
        "the model. Pass --api-key KEY (or set LORAKIT_API_KEY), bind 127.0.0.1, or pass "
        "--allow-insecure-bind if the network is trusted"
    )


def context_length(model: torch.nn.Module, tokenizer: Any, limit: int | None = None) -> int:
    """Tokens one sequence may hold: `limit`, else the model's position limit."""
    from lorakit.models import context_length as model_context

    if limit is not None:
        if limit < 2:
            raise ConfigError(f"max_model_len must be >= 2, got {limit}")
        return limit
    value = model_context(model, tokenizer)
    if value is None:
        raise ConfigError("cannot tell the model's context length; pass max_model_len")
    return value


def eos_ids(model: torch.nn.Module, tokenizer: Any) -> set[int]:
    """End-of-sequence token ids from the tokenizer and the model's generation config."""
    ids: set[int] = set()
    candidates = [getattr(tokenizer, "eos_token_id", None)]
    generation = getattr(model, "generation_config", None)
    candidates.append(getattr(generation, "eos_token_id", None))
    for value in candidates:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def build_state(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    base_name: str,
    adapters: dict[str, str | Path] | None = None,
    max_batch: int = 8,
    max_model_len: int | None = None,
    adapters_root: str | Path | None = None,
    allow_runtime_loading: bool = False,
    chat_template: str | None = None,
    threads: int | None = None,
    packed: bool = True,
    prepack: bool = True,
):
    """Load the adapters into the model and start the engine; returns the app's ServerState."""
    from lorakit.serve.app import ServerState

    if allow_runtime_loading and adapters_root is None:
        raise ConfigError("--allow-runtime-loading needs --adapters-root DIR")
    root = None
    if adapters_root is not None:
        root = Path(adapters_root).resolve()
        if not root.is_dir():
            raise ConfigError(f"--adapters-root {adapters_root}: not a directory")
    model.eval()
    from lorakit.models import chat_template_of

    chat = chat_template or chat_template_of(tokenizer)
    host = ModelHost(model, base_name, chat, packed=packed, prepack=prepack)
    for name, path in (adapters or {}).items():
        host.load(name, path)  # raises with the reason; the server does not start
        log.info("adapter %s loaded from %s", name, path)
    max_context = context_length(model, tokenizer, max_model_len)
    engine = Engine(
        host,
        tokenizer,
        max_context=max_context,
        max_batch=max_batch,
        eos_token_ids=eos_ids(model, tokenizer),
        threads=threads,
    )
    engine.start()
    return ServerState(host, engine, tokenizer, max_context, root, allow_runtime_loading)


def served_models(base_name: str, adapters: list[str], host: str, port: int) -> str:
    """What the server prints on start: its address and the model ids a request may name."""
    lines = [f"serving http://{host}:{port}/v1 (OpenAI-compatible); model ids for requests:"]
    lines.append(f"  {base_name}  (the base model)")
    lines += [f"  {name}  (adapter)" for name in adapters]
    return "\n".join(lines)


def serve_main(
    model: str | None,
    adapters: list[str] | dict[str, str | Path] | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 8,
    adapters_root: str | Path | None = None,
    allow_runtime_loading: bool = False,
    allow_insecure_bind: bool = False,
    dtype: str = "float32",
    device: str = "cpu",
    max_model_len: int | None = None,
    max_body_bytes: int = 1 << 20,
    served_model_name: str | None = None,
    threads: int | None = None,
    prepack: bool = True,
    extend: Callable[[Any], None] | None = None,
    open_paths: frozenset[str] = frozenset(),
    banner: str | None = None,
) -> None:
    """`lorakit serve`: load the base and adapters, then serve the OpenAI API until stopped.

    model None serves no model (the web page's runs view alone); extend, open_paths: see
    `create_app`; banner: a line printed after the served model ids.
    """
    api_key = api_key or os.environ.get("LORAKIT_API_KEY") or None
    check_bind(host, api_key, allow_insecure_bind)
    try:
        import uvicorn

        from lorakit.serve.app import create_app
    except ImportError as missing:
        raise ImportError(
            f"{missing}; install the serve extra: pip install 'lorakit[serve]'"
        ) from None
    from lorakit.models import load_model, load_tokenizer
    from lorakit.models.vocab import adapter_tokenizer, fit_vocabulary

    specs = adapters if isinstance(adapters, dict) else parse_adapters(list(adapters or []))
    state = None
    if model is None:
        if specs or adapters_root is not None:
            raise ConfigError("--adapter and --adapters-root need a base model: pass --model BASE")
    else:
        base = load_model(model, dtype=dtype, device=device)
        tokenizer = adapter_tokenizer(specs.values()) or load_tokenizer(model)
        fit_vocabulary(base, tokenizer)  # adapters trained with added tokens
        state = build_state(
            base,
            tokenizer,
            base_name=served_model_name or model,
            adapters=specs,
            max_batch=max_batch,
            max_model_len=max_model_len,
            adapters_root=adapters_root,
            allow_runtime_loading=allow_runtime_loading,
            threads=threads,
            prepack=prepack,
        )
    app = create_app(
        state, api_key=api_key, max_body_bytes=max_body_bytes, extend=extend, open_paths=open_paths
    )
    if state is not None:
        print(served_models(state.host.base_name, list(state.host.adapters), host, port))
    if banner:
        print(banner)
    sys.stdout.flush()
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        if state is not None:
            state.engine.shutdown()
