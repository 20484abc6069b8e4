"""The server's guard: API key on every route but /health, a cap on request bodies and on the
time they take to arrive."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import Any

from lorakit.serve.protocol import ApiError

OPEN_PATHS = frozenset({"/health"})
log = logging.getLogger("lorakit.serve")


class GuardMiddleware:
    """Pure ASGI middleware: 401 without the right bearer key (but on `open_paths`), 413 for
    bodies over the cap.

    The key is compared in constant time. The body is read (at most `max_body_bytes` + 1
    bytes) before the app runs and handed on unchanged; later `receive` calls go straight to
    the server, so handlers still see the client disconnect. A body that stops arriving for
    `body_timeout_s` gets 408; a client that leaves mid-upload is logged in one line.
    """

    def __init__(
        self,
        app: Any,
        api_key: str | None,
        max_body_bytes: int,
        body_timeout_s: float = 30.0,
        open_paths: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.open_paths = OPEN_PATHS | open_paths
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.expected is not None and scope.get("path") not in self.open_paths:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                message = "missing or wrong API key: send 'Authorization: Bearer <key>'"
                await send_error(send, ApiError(401, message))
                return
        declared = headers.get(b"content-length", b"").strip()
        if declared and not declared.isdigit():
            await send_error(send, ApiError(400, "Content-Length must be a number of bytes"))
            return
        if declared and int(declared) > self.max_body_bytes:
            await send_error(send, _too_large(self.max_body_bytes))
            return
        chunks, size = [], 0
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s
        while True:
            try:
                left = deadline - asyncio.get_running_loop().time()
                message = await asyncio.wait_for(receive(), max(left, 0))
            except asyncio.TimeoutError:
                got = f"{size} of {int(declared)}" if declared else f"{size}"
                late = f"the request body did not arrive within {self.body_timeout_s:g} s"
                await send_error(send, ApiError(408, f"{late} ({got} bytes came)"))
                return
            if message["type"] == "http.disconnect":
                log.info("%s %s: the client left before sending its whole body", *_route(scope))
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                await send_error(send, _too_large(self.max_body_bytes))
                return
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)


def _route(scope: dict) -> tuple[str, str]:
    return scope.get("method", "?"), scope.get("path", "?")


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body larger than {limit} bytes")


def _replay(messages: list[dict], receive: Any) -> Any:
    async def replayed() -> dict:
        if messages:
            return messages.pop(0)
        return await receive()

    return replayed


async def send_error(send: Any, error: ApiError) -> None:
    """Answer an ASGI request with an ApiError's JSON."""
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if error.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
