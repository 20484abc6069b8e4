"""The HTTP API's guarantees: auth everywhere, OpenAI-shaped errors, limits, path containment,
runtime loading that never breaks other adapters, streaming and cancellation."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from lorakit.errors import ConfigError
from lorakit.serve import build_state, check_bind, serve_main
from lorakit.serve.app import create_app
from serve_support import (
    BASE_NAME,
    VOCAB,
    live_server,
    make_adapters,
    make_model,
    make_tokenizer,
)

KEY = "sk-serve-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY = 64 * 1024
PLAIN_TEMPLATE = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"


def _make_root(tmp):
    """adapters root with a good, a truncated, a wrong-base and two escaping adapters."""
    root, outside = tmp / "root", tmp / "outside"
    root.mkdir()
    outside.mkdir()
    make_adapters(root, ["good", "other"])
    make_adapters(root, ["templated"], template=PLAIN_TEMPLATE)
    make_adapters(outside, ["secret"])
    shutil.copytree(root / "good", root / "broken")
    weights = root / "broken" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    _wrong_base_adapter(root / "wrongbase")
    os.symlink(outside / "secret", root / "escape")
    (root / "sneaky").mkdir()
    shutil.copy(root / "good" / "adapter_config.json", root / "sneaky")
    os.symlink(
        outside / "secret" / "adapter_model.safetensors",
        root / "sneaky" / "adapter_model.safetensors",
    )
    return root, outside


def _wrong_base_adapter(path):
    from conftest import make_tiny_llama
    from lorakit import LoraConfig, get_peft_model

    wide = make_tiny_llama(vocab_size=VOCAB, hidden=64)
    lora = get_peft_model(wide, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    lora.save_pretrained(path)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_api")
    root, _ = _make_root(tmp)
    startup = make_adapters(tmp / "startup", ["a"])
    state = build_state(
        make_model(),
        make_tokenizer(),
        base_name=BASE_NAME,
        adapters=startup,
        max_batch=8,
        adapters_root=root,
        allow_runtime_loading=True,
        threads=1,
    )
    try:
        app = create_app(state, api_key=KEY, max_body_bytes=MAX_BODY)
        with (
            live_server(app) as url,
            httpx.Client(base_url=url, headers=AUTH, timeout=30) as client,
        ):
            yield client, state
    finally:
        state.engine.shutdown()


def _complete(client, model="a", **extra):
    body = {"model": model, "prompt": "Hello", "max_tokens": 4, "temperature": 0, **extra}
    return client.post("/v1/completions", json=body)


def _listed(client):
    return {m["id"] for m in client.get("/v1/models").json()["data"]}


def _assert_error(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    return error


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


def test_unknown_route_and_disabled_endpoint_are_not_model_not_found(server):
    client, state = server
    error = _assert_error(client.post("/v1/no/such/route", json={}), 404)
    assert error["code"] == "unknown_url" and "POST /v1/no/such/route" in error["message"]
    off = dataclasses.replace(state, allow_runtime_loading=False)
    app = create_app(off, api_key=KEY, max_body_bytes=MAX_BODY)
    with live_server(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=30) as other:
        body = {"lora_name": "x", "lora_path": "good"}
        for route in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            error = _assert_error(other.post(route, json=body), 404)
            assert error["code"] == "endpoint_disabled", route
            assert "--allow-runtime-loading" in error["message"]


def test_serve_prints_the_model_ids_it_serves():
    from lorakit.serve.main import served_models

    text = served_models("smollm2-135m-instruct", ["lumi", "pirate"], "127.0.0.1", 8000)
    assert "http://127.0.0.1:8000/v1" in text
    assert [line.split()[0] for line in text.splitlines()[1:]] == [
        "smollm2-135m-instruct",
        "lumi",
        "pirate",
    ]


def test_unknown_model_is_404(server):
    client, _ = server
    error = _assert_error(_complete(client, model="aa"), 404)
    assert error["code"] == "model_not_found" and "`a`" in error["message"]
    chat = {"model": "zzz", "messages": [{"role": "user", "content": "hi"}]}
    _assert_error(client.post("/v1/chat/completions", json=chat), 404)


@pytest.mark.parametrize(
    "change,param",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "ten"}, "max_tokens"),
        ({"max_tokens": 300}, "max_tokens"),  # 5 prompt tokens + 300 > context 256
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -5}, "top_k"),
        ({"n": 2}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"prompt": [1, 2, VOCAB + 5]}, "prompt"),
        ({"prompt": "x" * 300}, "max_tokens"),
        ({"prompt": ""}, "prompt"),
    ],
)
def test_bad_parameters_are_400(server, change, param):
    client, _ = server
    error = _assert_error(_complete(client, **change), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_bad_bodies_are_400(server):
    client, _ = server
    headers = {**AUTH, "content-type": "application/json"}
    _assert_error(client.post("/v1/completions", content=b"{not json", headers=headers), 400)
    _assert_error(client.post("/v1/completions", content=b"[1, 2]", headers=headers), 400)
    bad_role = {"model": "a", "messages": [{"role": "wizard", "content": "hi"}]}
    _assert_error(client.post("/v1/chat/completions", json=bad_role), 400)
    _assert_error(client.post("/v1/chat/completions", json={"model": "a", "messages": []}), 400)


def test_oversized_body_is_413(server):
    client, _ = server
    body = json.dumps({"model": "a", "prompt": "x" * (MAX_BODY + 10)}).encode()
    _assert_error(client.post("/v1/completions", content=body), 413)

    def chunked():  # no Content-Length: the cap applies while reading
        for start in range(0, len(body), 8192):
            yield body[start : start + 8192]

    _assert_error(client.post("/v1/completions", content=chunked()), 413)


TRAVERSALS = [
    "../outside/secret",
    "good/../../outside/secret",
    "./../outside/secret",
    "%2e%2e/outside/secret",
    "..%2foutside%2fsecret",
    "..\\outside\\secret",
    "~/secret",
    "escape",  # a symlink to a folder outside the root
    "sneaky",  # a folder whose weights file links outside the root
    "good\u0000",
    "C:/secret",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_paths_leaving_the_root_are_refused(server, path):
    client, _ = server
    before = _listed(client)
    response = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path})
    assert response.status_code in (400, 404), response.text
    assert _listed(client) == before


def test_absolute_paths_are_refused(server, tmp_path_factory):
    client, _ = server
    secret = next(tmp_path_factory.getbasetemp().glob("serve_api*/outside/secret"))
    for path in (str(secret), "/etc"):
        body = {"lora_name": "x", "lora_path": path}
        _assert_error(client.post("/v1/load_lora_adapter", json=body), 400)


@pytest.mark.parametrize("name", ["../x", "a/b", BASE_NAME, "-x", "x" * 65])
def test_bad_adapter_names_are_refused(server, name):
    client, _ = server
    body = {"lora_name": name, "lora_path": "good"}
    assert client.post("/v1/load_lora_adapter", json=body).status_code == 400


def test_broken_adapters_fail_alone(server):
    """Truncated weights, a wrong base and a missing folder fail while `a` keeps serving."""
    client, _ = server
    before = _complete(client).json()["choices"][0]["text"]
    answers: list[int] = []

    def traffic():
        for _ in range(6):
            answers.append(_complete(client).status_code)

    thread = threading.Thread(target=traffic)
    thread.start()
    for path, status, says in [
        ("broken", 400, "adapter_model.safetensors"),
        ("wrongbase", 400, "shape"),
        ("missing", 404, "missing"),
    ]:
        response = client.post("/v1/load_lora_adapter", json={"lora_name": path, "lora_path": path})
        assert says in _assert_error(response, status)["message"]
    thread.join(timeout=60)
    assert answers == [200] * 6
    assert _listed(client) == {BASE_NAME, "a"}
    assert _complete(client).json()["choices"][0]["text"] == before


def test_load_use_and_unload(server):
    client, _ = server
    body = {"lora_name": "good", "lora_path": "good"}
    assert client.post("/v1/load_lora_adapter", json=body).status_code == 200
    cards = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert cards["good"]["parent"] == BASE_NAME
    assert _complete(client, model="good").status_code == 200
    _assert_error(client.post("/v1/load_lora_adapter", json=body), 400)  # already loaded
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "good"}).status_code == 200
    _assert_error(_complete(client, model="good"), 404)
    _assert_error(client.post("/v1/unload_lora_adapter", json={"lora_name": "good"}), 404)


def test_reloading_a_name_serves_the_new_weights(server):
    client, _ = server

    def run_as(name, path):
        body = {"lora_name": name, "lora_path": path}
        assert client.post("/v1/load_lora_adapter", json=body).status_code == 200
        text = _complete(client, model=name, max_tokens=8).json()["choices"][0]["text"]
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200
        return text

    first = run_as("swap", "good")
    second = run_as("swap", "other")
    assert second == run_as("other", "other") and second != first


def test_chat_uses_the_adapters_own_template(server):
    client, _ = server
    body = {"lora_name": "templated", "lora_path": "templated"}
    assert client.post("/v1/load_lora_adapter", json=body).status_code == 200
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    own = client.post("/v1/chat/completions", json={**chat, "model": "templated"}).json()
    base = client.post("/v1/chat/completions", json={**chat, "model": BASE_NAME}).json()
    assert own["usage"]["prompt_tokens"] == len("[hi]")
    tokenizer = make_tokenizer()
    chatml = tokenizer.apply_chat_template(
        chat["messages"], add_generation_prompt=True, tokenize=False
    )
    assert base["usage"]["prompt_tokens"] == len(tokenizer(chatml)["input_ids"]) > 10
    client.post("/v1/unload_lora_adapter", json={"lora_name": "templated"})


def test_chat_with_no_template_anywhere_uses_the_plain_format(server):
    """A base without a chat template (and an adapter without one) is prompted in lorakit's
    plain format, the one it trains such a model in, as generate and eval do."""
    from lorakit.models import PLAIN_TEMPLATE as LORAKIT_PLAIN
    from lorakit.models.templates import prompt_ids

    client, state = server
    messages = [{"role": "user", "content": "hi"}]
    saved = state.host.chat_template
    state.host.chat_template = state.tokenizer.chat_template = None
    try:
        answer = client.post(
            "/v1/chat/completions", json={"model": "a", "messages": messages, "max_tokens": 2}
        )
    finally:
        state.host.chat_template = state.tokenizer.chat_template = saved
    assert answer.status_code == 200, answer.text
    plain = prompt_ids(make_tokenizer(), messages, LORAKIT_PLAIN)
    assert answer.json()["usage"]["prompt_tokens"] == len(plain) > len("hi")


def test_stream_ends_with_done(server):
    client, _ = server
    body = {"model": "a", "prompt": "Hi", "max_tokens": 5, "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_mid_stream_failure_arrives_as_an_error_event(server, monkeypatch):
    client, state = server

    def broken_prefill(seq):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(state.engine, "_prefill", broken_prefill)
    body = {"model": "a", "prompt": "Hi", "max_tokens": 3, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as response:
        lines = [line for line in response.iter_lines() if line]
    monkeypatch.undo()
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][len("data: ") :])["error"]
    assert "simulated failure" in error["message"] and error["type"] == "server_error"
    assert _complete(client).status_code == 200  # the engine serves on


LONG = {"model": "a", "prompt": "Hi", "max_tokens": 240, "temperature": 0}


def test_long_request_runs_to_max_tokens(server):
    """The request the cancellation tests cut short really would run for 240 tokens."""
    client, _ = server
    assert client.post("/v1/completions", json=LONG).json()["usage"]["completion_tokens"] == 240


@pytest.fixture
def slow_engine(server, monkeypatch):
    """Decode steps of at least 5 ms, and the finish reason of every request recorded.

    240 tokens then take over 1.2 s, so a cancellation that works always lands first.
    """
    _, state = server
    decode, finish, reasons = state.engine._decode_step, state.engine._finish, []

    def slow_decode():
        time.sleep(0.005)
        decode()

    def recording_finish(seq, reason, *args, **kwargs):
        reasons.append(reason)
        return finish(seq, reason, *args, **kwargs)

    monkeypatch.setattr(state.engine, "_decode_step", slow_decode)
    monkeypatch.setattr(state.engine, "_finish", recording_finish)
    return reasons


def _wait_until_idle(state):
    deadline = time.monotonic() + 20
    while state.engine.load != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert state.engine.load == (0, 0)


def test_disconnect_stops_generation(server, slow_engine):
    client, state = server
    steps = state.engine.steps
    with client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as response:
        next(response.iter_lines())  # the first token arrived; now hang up
    _wait_until_idle(state)
    assert slow_engine == ["cancelled"]
    assert state.engine.steps - steps < 200


def test_client_timeout_stops_a_non_streaming_request(server, slow_engine):
    client, state = server
    steps = state.engine.steps
    with pytest.raises(httpx.TimeoutException):
        client.post("/v1/completions", json=LONG, timeout=0.05)
    _wait_until_idle(state)
    assert slow_engine == ["cancelled"]
    assert state.engine.steps - steps < 200


def test_runtime_loading_is_off_by_default():
    state = build_state(make_model(), make_tokenizer(), base_name=BASE_NAME, threads=1)
    try:
        with live_server(create_app(state)) as url:
            body = {"lora_name": "x", "lora_path": "x"}
            response = httpx.post(f"{url}/v1/load_lora_adapter", json=body, timeout=10)
            assert "allow-runtime-loading" in _assert_error(response, 404)["message"]
            assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 200  # no key set
    finally:
        state.engine.shutdown()


def test_non_loopback_bind_needs_a_key():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_bind(host, None, False)
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.com"):
        with pytest.raises(ConfigError, match="--api-key"):
            check_bind(host, None, False)
        check_bind(host, "key", False)
        check_bind(host, None, True)
    with pytest.raises(ConfigError):  # refused before any model is loaded
        serve_main("no-such-model", host="0.0.0.0")


def test_torch_is_not_left_in_grad_mode(server):
    _, state = server
    assert not any(p.requires_grad for p in state.host.forward_model.parameters())
    assert torch.is_grad_enabled()


def test_missing_fastapi_names_the_extra(monkeypatch):
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "fastapi", None)
    monkeypatch.delitem(sys.modules, "lorakit.serve.app", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'lorakit\[serve\]'"):
        importlib.import_module("lorakit.serve.app")


def test_serve_main_in_a_subprocess(tmp_path):
    """serve_main loads a model folder and an adapter given as a bare path (named after its
    folder), listens on 127.0.0.1 and answers."""
    import socket
    import subprocess
    import sys

    import lorakit

    make_model().save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    make_adapters(tmp_path, ["x"])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = (
        "from lorakit.serve import serve_main; "
        f"serve_main({str(tmp_path / 'model')!r}, [{str(tmp_path / 'x')!r}], port={port}, "
        "api_key='k', served_model_name='tiny', threads=1)"
    )
    src = str(Path(lorakit.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    log = (tmp_path / "server.log").open("wb")
    process = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and process.poll() is None:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        assert process.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
        headers = {"Authorization": "Bearer k"}
        models = httpx.get(f"{url}/v1/models", headers=headers, timeout=10).json()["data"]
        assert [(m["id"], m["parent"]) for m in models] == [("tiny", None), ("x", "tiny")]
        body = {"model": "x", "prompt": "Hi", "max_tokens": 3}
        answer = httpx.post(f"{url}/v1/completions", headers=headers, json=body, timeout=30)
        assert answer.status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
