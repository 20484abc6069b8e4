"""The OpenAI-compatible HTTP API: models, completions, chat, streaming, adapter loading."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.background import BackgroundTask
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
except ImportError as missing:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"lorakit serve needs FastAPI and uvicorn ({missing.name} is missing): "
        "pip install 'lorakit[serve]'"
    ) from missing

from lorakit.errors import LorakitError, closest
from lorakit.models import templates
from lorakit.serve.decode import SamplingParams
from lorakit.serve.engine import FINISH_ERROR, Engine, Event
from lorakit.serve.middleware import GuardMiddleware
from lorakit.serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    LoadAdapterRequest,
    UnloadAdapterRequest,
    parse_body,
)
from lorakit.serve.registry import Lease, ModelHost, check_adapter_name, resolve_under_root


@dataclass
class ServerState:
    """Everything the routes need."""

    host: ModelHost
    engine: Engine
    tokenizer: Any
    max_context: int
    adapters_root: Path | None = None
    allow_runtime_loading: bool = False


@dataclass
class _Job:
    """A validated generation request, ready for the engine."""

    model: str
    lease: Lease | None  # the hold on the adapter (None: the base model), the engine's to end
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    chat: bool
    include_usage: bool


def create_app(
    state: ServerState | None,
    *,
    api_key: str | None = None,
    max_body_bytes: int = 1 << 20,
    body_timeout_s: float = 30.0,
    extend: Callable[[Any], None] | None = None,
    open_paths: frozenset[str] = frozenset(),
) -> Any:
    """The ASGI app: FastAPI routes behind the key, body-size and body-time guard.

    state None: no model is served and every /v1 route says so. extend(app) adds routes (the
    web page's); open_paths are served without the key besides /health (the page's own files,
    which hold no data: the page asks for the key and sends it with its API calls).
    """
    app = FastAPI(title="lorakit serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.lorakit = state
    _add_error_handlers(app)
    if extend is not None:
        extend(app)

    @app.get("/health")
    async def health() -> dict:
        running, waiting = state.engine.load if state is not None else (0, 0)
        return {"status": "ok", "running": running, "waiting": waiting}

    if state is None:

        @app.api_route("/v1/{rest:path}", methods=["GET", "POST"])
        async def no_model(rest: str) -> None:
            raise ApiError(404, "no model is loaded; start with --model BASE", code="no_model")

    else:
        _add_model_routes(app, state)
    return GuardMiddleware(app, api_key, max_body_bytes, body_timeout_s, open_paths)


def _add_model_routes(app: Any, state: ServerState) -> None:
    """The OpenAI-compatible routes of the served model."""

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": _model_cards(state.host)}

    # parsing, validating and tokenizing (with the chat template) run in a worker thread, so
    # long prompts never hold up the event loop (/health, streams, other requests)
    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        raw = await request.body()
        return await _run(request, state, await run_in_threadpool(_completion_job, state, raw))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        raw = await request.body()
        return await _run(request, state, await run_in_threadpool(_chat_job, state, raw))

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(request: Request) -> dict:
        body = parse_body(LoadAdapterRequest, await _json(request))
        return await _load(state, body)

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(request: Request) -> dict:
        body = parse_body(UnloadAdapterRequest, await _json(request))
        return await _unload(state, body)


def _add_error_handlers(app: Any) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        if error.status_code in (404, 405):  # no such route (or method): not a missing model
            message = f"no route {request.method} {request.url.path}; see GET /v1/models"
            wrapped = ApiError(error.status_code, message, code="unknown_url")
        else:
            wrapped = ApiError(error.status_code, str(error.detail))
        return JSONResponse(wrapped.body(), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def crash(_: Request, error: Exception) -> JSONResponse:
        wrapped = ApiError(500, f"internal error: {type(error).__name__}: {error}")
        return JSONResponse(wrapped.body(), status_code=500)


async def _json(request: Request) -> Any:
    return _parse_json(await request.body())


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except RecursionError:
        raise ApiError(400, "the request body nests JSON too deeply") from None
    except ValueError as error:  # bad JSON or UTF-8, or an integer of over 4300 digits
        raise ApiError(400, f"the request body is not valid JSON: {error}") from None


def _model_cards(host: ModelHost) -> list[dict]:
    base = {"id": host.base_name, "object": "model", "created": host.created}
    cards = [{**base, "owned_by": "lorakit", "root": host.base_name, "parent": None}]
    for entry in list(host.adapters.values()):
        cards.append(
            {
                "id": entry.name,
                "object": "model",
                "created": entry.created,
                "owned_by": "lorakit",
                "root": str(entry.path),
                "parent": host.base_name,
            }
        )
    return cards


def _hold_adapter(state: ServerState, model: str) -> Lease | None:
    """None for the base model's name, a hold on the adapter for an adapter; 404 otherwise."""
    if model == state.host.base_name:
        return None
    try:
        return state.host.acquire(model)
    except LookupError:
        pass
    if state.host.leaving(model):
        message = f"The model `{model}` is being unloaded; it takes no new requests."
        raise ApiError(404, message, "model")
    names = [state.host.base_name, *state.host.adapters]
    raise ApiError(404, f"The model `{model}` does not exist{closest(model, names)}.", "model")


def _completion_job(state: ServerState, raw: bytes) -> _Job:
    body = parse_body(CompletionRequest, _parse_json(raw))
    lease = _hold_adapter(state, body.model)
    try:
        if isinstance(body.prompt, str):
            prompt_ids = list(state.tokenizer(body.prompt)["input_ids"])
        else:
            vocab = state.host.forward_model.config.vocab_size
            if any(not 0 <= t < vocab for t in body.prompt):
                raise ApiError(400, f"prompt: token ids must be in [0, {vocab})", "prompt")
            prompt_ids = list(body.prompt)
        return _job(state, body, lease, prompt_ids, body.max_tokens, chat=False)
    except BaseException:
        _let_go(lease)
        raise


def _chat_job(state: ServerState, raw: bytes) -> _Job:
    body = parse_body(ChatRequest, _parse_json(raw))
    lease = _hold_adapter(state, body.model)
    try:
        template = state.host.template_for(lease and lease.name)  # None: the plain format
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            ids = templates.prompt_ids(state.tokenizer, messages, template)
        except Exception as error:
            message = f"messages: the chat template failed: {error}"
            raise ApiError(400, message, "messages") from None
        return _job(state, body, lease, ids, body.token_budget(), chat=True)
    except BaseException:
        _let_go(lease)
        raise


def _let_go(lease: Lease | None) -> None:
    if lease is not None:
        lease.release()


def _job(
    state: ServerState,
    body: Any,
    lease: Lease | None,
    prompt_ids: list[int],
    budget: int | None,
    chat: bool,
) -> _Job:
    if not prompt_ids:
        raise ApiError(400, "the prompt is empty", "prompt")
    room = state.max_context - len(prompt_ids)
    if budget is None:
        budget = room
    if budget < 1 or len(prompt_ids) + budget > state.max_context:
        raise ApiError(
            400,
            f"this model's context is {state.max_context} tokens; the prompt has "
            f"{len(prompt_ids)} and max_tokens asks for {budget}: shorten the prompt or lower "
            "max_tokens",
            "max_tokens",
        )
    params = SamplingParams(
        max_tokens=budget,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k_value(),
        stop=body.stop_strings(),
        seed=body.seed,
    )
    usage = body.stream_options is not None and body.stream_options.include_usage
    return _Job(body.model, lease, prompt_ids, params, body.stream, chat, usage)


async def _run(request: Request, state: ServerState, job: _Job) -> Any:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def sink(event: Event) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server is stopping
            loop.call_soon_threadsafe(events.put_nowait, event)

    adapter = job.lease.name if job.lease is not None else None
    seq = state.engine.submit(job.prompt_ids, adapter, job.params, sink, lease=job.lease)
    if job.stream:
        stream = _stream(state.engine, seq, events, job)
        # also runs when the client left before the stream started
        cleanup = BackgroundTask(lambda: None if seq.finished else state.engine.cancel(seq))
        return StreamingResponse(stream, media_type="text/event-stream", background=cleanup)
    collector = asyncio.ensure_future(_collect(events))
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not collector.done():
            raise ApiError(499, "the client closed the connection")
        text, finish, error, count = collector.result()
    finally:
        watcher.cancel()
        collector.cancel()
        if not seq.finished:
            state.engine.cancel(seq)
    if error is not None or finish == FINISH_ERROR:
        raise ApiError(500, f"generation failed: {error}")
    if finish not in ("stop", "length"):
        raise ApiError(503, "the server is shutting down")
    return _final_body(job, text, finish, count)


async def _collect(events: asyncio.Queue) -> tuple[str, str, str | None, int]:
    parts: list[str] = []
    count = 0
    while True:
        event = await events.get()
        parts.append(event.text)
        count += len(event.token_ids)
        if event.finish_reason is not None:
            return "".join(parts), event.finish_reason, event.error, count


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _final_body(job: _Job, text: str, finish: str, count: int) -> dict:
    usage = _usage(job, count)
    if job.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        kind, prefix = "chat.completion", "chatcmpl"
    else:
        choice = {"index": 0, "text": text, "logprobs": None}
        kind, prefix = "text_completion", "cmpl"
    choice["finish_reason"] = finish
    return {**_header(job, kind, prefix), "choices": [choice], "usage": usage}


def _usage(job: _Job, count: int) -> dict:
    prompt = len(job.prompt_ids)
    return {"prompt_tokens": prompt, "completion_tokens": count, "total_tokens": prompt + count}


def _header(job: _Job, kind: str, prefix: str, ident: str | None = None) -> dict:
    ident = ident or f"{prefix}-{uuid.uuid4().hex}"
    return {"id": ident, "object": kind, "created": int(time.time()), "model": job.model}


async def _stream(engine: Engine, seq: Any, events: asyncio.Queue, job: _Job) -> AsyncIterator:
    """Server-sent events: one chunk per step, an error event if one happens, then [DONE]."""
    kind, prefix = (
        ("chat.completion.chunk", "chatcmpl") if job.chat else ("text_completion", "cmpl")
    )
    header = _header(job, kind, prefix)
    count = 0
    try:
        if job.chat:
            yield _sse({**header, "choices": [_delta(job, {"role": "assistant", "content": ""})]})
        while True:
            event = await events.get()
            count += len(event.token_ids)
            if event.finish_reason in (None, "stop", "length"):
                choice = _delta(job, {"content": event.text}, event.finish_reason)
                if event.text or event.finish_reason:
                    yield _sse({**header, "choices": [choice]})
            else:
                message = event.error or "generation was cancelled"
                yield _sse(ApiError(500, f"generation failed: {message}").body())
            if event.finish_reason is not None:
                break
        if job.include_usage:
            yield _sse({**header, "choices": [], "usage": _usage(job, count)})
        yield "data: [DONE]\n\n"
    finally:
        if not seq.finished:
            engine.cancel(seq)


def _delta(job: _Job, delta: dict, finish: str | None = None) -> dict:
    if job.chat:
        return {"index": 0, "delta": delta, "finish_reason": finish}
    return {"index": 0, "text": delta.get("content", ""), "logprobs": None, "finish_reason": finish}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _load(state: ServerState, body: LoadAdapterRequest) -> dict:
    if not state.allow_runtime_loading or state.adapters_root is None:
        raise ApiError(
            404,
            "runtime adapter loading is off; start the server with --adapters-root DIR "
            "--allow-runtime-loading",
            code="endpoint_disabled",
        )
    try:
        check_adapter_name(body.lora_name, state.host.base_name)
        path = resolve_under_root(state.adapters_root, body.lora_path)
    except LorakitError as error:
        raise ApiError(400, str(error), "lora_path") from None
    except FileNotFoundError as error:
        raise ApiError(404, str(error), "lora_path") from None
    name = body.lora_name
    if state.host.leaving(name):
        raise ApiError(
            409,
            f"adapter `{name}` is still being unloaded ({state.host.holds(name)} requests use "
            "it); load it again once the unload call has returned",
            "lora_name",
        )
    try:
        await run_in_threadpool(state.host.load, body.lora_name, path)
    except Exception as error:  # a broken adapter is the client's problem, never a 500
        raise ApiError(400, f"adapter `{body.lora_name}` was not loaded: {error}") from None
    return {"status": "ok", "lora_name": body.lora_name}


async def _unload(state: ServerState, body: UnloadAdapterRequest) -> dict:
    if not state.allow_runtime_loading:
        raise ApiError(
            404,
            "runtime adapter loading is off; see --allow-runtime-loading",
            code="endpoint_disabled",
        )
    name = body.lora_name
    try:
        gone = await run_in_threadpool(state.host.unload, name)
    except KeyError:
        if state.host.leaving(name):
            raise ApiError(
                404, f"adapter `{name}` is already being unloaded", "lora_name"
            ) from None
        raise ApiError(404, f"no adapter named `{name}` is loaded", "lora_name") from None
    # new requests for it get 404 from now on; the ones running finish first
    await run_in_threadpool(gone.wait)
    return {"status": "ok", "lora_name": name}
