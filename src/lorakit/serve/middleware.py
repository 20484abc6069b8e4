"""The server's guard: API key on every route but /health, and a cap on request bodies."""

from __future__ import annotations

import hmac
import json
from typing import Any

from lorakit.serve.protocol import ApiError

OPEN_PATHS = frozenset({"/health"})


class GuardMiddleware:
    """Pure ASGI middleware: 401 without the right bearer key, 413 for bodies over the cap.

    The key is compared in constant time. The body is read (at most `max_body_bytes` + 1
    bytes) before the app runs and handed on unchanged; later `receive` calls go straight to
    the server, so handlers still see the client disconnect.
    """

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.expected is not None and scope.get("path") not in OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                message = "missing or wrong API key: send 'Authorization: Bearer <key>'"
                await send_error(send, ApiError(401, message))
                return
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            await send_error(send, _too_large(self.max_body_bytes))
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message], receive), send)
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
