"""The server's guard (serve/middleware.py): the API key on every route but /health, the cap on
bodies, bodies that stop arriving or whose client leaves; and the middleware on its own."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time

import httpx
import pytest
from test_app import AUTH, KEY, MAX_BODY, _assert_error

from lorakit.serve import build_state
from lorakit.serve.middleware import GuardMiddleware
from serve_support import BASE_NAME, live_client, make_model, make_tokenizer


@pytest.fixture(scope="module")
def state():
    state = build_state(make_model(), make_tokenizer(), base_name=BASE_NAME, threads=1)
    yield state
    state.engine.shutdown()


@pytest.fixture(scope="module")
def server(state):
    """Behind the API key, bodies up to MAX_BODY (64 KiB)."""
    with live_client(state, headers=AUTH, api_key=KEY, max_body_bytes=MAX_BODY) as client:
        yield client, state


@pytest.fixture(scope="module")
def served(state):
    """No API key; a body must arrive within 1 s."""
    with live_client(state, timeout=60, max_body_bytes=2 << 20, body_timeout_s=1.0) as client:
        yield client, state


ROUTES = [
    ("GET", "/v1/models"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/load_lora_adapter"),
    ("POST", "/v1/unload_lora_adapter"),
    ("GET", "/no/such/route"),
]


@pytest.mark.parametrize("method,path", ROUTES)
@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Bearer {KEY}x", KEY, f"bearer {KEY}"])
def test_every_route_but_health_needs_the_key(server, method, path, header):
    client, _ = server
    headers = {} if header is None else {"Authorization": header}
    url = str(client.base_url).rstrip("/") + path
    response = httpx.request(method, url, headers=headers, json={}, timeout=10)
    assert _assert_error(response, 401)["type"] == "authentication_error"


def test_health_is_open(server):
    client, _ = server
    response = httpx.get(str(client.base_url).rstrip("/") + "/health", timeout=10)
    assert response.status_code == 200 and response.json()["status"] == "ok"


def test_oversized_body_is_413(server):
    client, _ = server
    body = json.dumps({"model": "a", "prompt": "x" * (MAX_BODY + 10)}).encode()
    _assert_error(client.post("/v1/completions", content=body), 413)

    def chunked():  # no Content-Length: the cap applies while reading
        for start in range(0, len(body), 8192):
            yield body[start : start + 8192]

    _assert_error(client.post("/v1/completions", content=chunked()), 413)


def _raw(url, head: bytes, body: bytes, close: bool = False) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head + b"\r\n\r\n" + body)
        if close:
            return b""
        answer = sock.recv(4096)
        while b"\r\n\r\n{" not in answer or not answer.endswith(b"}"):
            answer += sock.recv(4096)  # the JSON body may come in its own packet
        return answer


def test_a_body_that_stops_arriving_gets_408(served):
    client, _ = served
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length:  100 "
    start = time.monotonic()
    answer = _raw(str(client.base_url), head, b'{"model": "a"')
    assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - start < 5
    assert b"did not arrive within 1 s (13 of 100 bytes came)" in answer


def test_a_client_leaving_mid_upload_is_one_log_line(served, caplog):
    client, _ = served
    caplog.set_level(logging.INFO)
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100"
    _raw(str(client.base_url), head, b'{"model": "a"', close=True)
    deadline = time.monotonic() + 5
    while "left before sending" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "POST /v1/completions: the client left before sending its whole body" in caplog.text
    assert not [r for r in caplog.records if r.exc_info], caplog.text
    assert client.get("/health").status_code == 200


async def _echo(scope, receive, send):
    """An app that answers 200 with the body it was handed."""
    message = await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": message["body"]})


def _call(guard, path, headers, chunks):
    """Run one request through `guard`; (status, headers, body) of its answer."""
    messages = [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
        for i, chunk in enumerate(chunks)
    ]
    sent = []

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
    asyncio.run(guard(scope, receive, send))
    return sent[0]["status"], dict(sent[0]["headers"]), sent[1]["body"]


def test_the_guard_on_its_own():
    guard = GuardMiddleware(_echo, api_key="k", max_body_bytes=10)
    key = [(b"authorization", b"Bearer k")]
    # a body in two parts (7 bytes, under the cap of 10) reaches the app whole
    assert _call(guard, "/v1/x", key, [b"abc", b"defg"]) == (200, {}, b"abcdefg")
    status, headers, body = _call(guard, "/v1/x", [], [b"{}"])
    assert (status, headers[b"www-authenticate"]) == (401, b"Bearer")
    assert json.loads(body)["error"]["code"] == "invalid_api_key"
    assert _call(guard, "/health", [], [b"ok"])[0] == 200  # open without the key
    # 6 + 5 = 11 bytes: over the cap once the second part arrives
    status, _, body = _call(guard, "/v1/x", key, [b"abcdef", b"ghijk"])
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    assert "larger than 10 bytes" in json.loads(body)["error"]["message"]
    status, _, body = _call(guard, "/v1/x", [*key, (b"content-length", b"12a")], [b""])
    assert status == 400
    assert json.loads(body)["error"]["message"] == "Content-Length must be a number of bytes"
    open_guard = GuardMiddleware(_echo, api_key=None, max_body_bytes=10)
    assert _call(open_guard, "/v1/x", [], [b"hi"]) == (200, {}, b"hi")  # no key set: no check
