"""The HTTP API's guarantees: OpenAI-shaped errors, path containment, runtime loading that
never breaks other adapters, chat templates, streaming and cancellation.

The API key and the body cap: test_middleware.py; request bodies: test_protocol.py; serve_main:
test_serve_main.py."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
import time

import httpx
import pytest
import torch

from lorakit.serve import build_state
from lorakit.serve.app import create_app
from serve_support import (
    BASE_NAME,
    VOCAB,
    live_client,
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
        with live_client(state, headers=AUTH, api_key=KEY, max_body_bytes=MAX_BODY) as client:
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


def test_unknown_route_and_disabled_endpoint_are_not_model_not_found(server):
    client, state = server
    error = _assert_error(client.post("/v1/no/such/route", json={}), 404)
    assert error["code"] == "unknown_url" and "POST /v1/no/such/route" in error["message"]
    off = dataclasses.replace(state, allow_runtime_loading=False)
    with live_client(off, headers=AUTH, api_key=KEY, max_body_bytes=MAX_BODY) as other:
        body = {"lora_name": "x", "lora_path": "good"}
        for route in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            error = _assert_error(other.post(route, json=body), 404)
            assert error["code"] == "endpoint_disabled", route
            assert "--allow-runtime-loading" in error["message"]


def test_unknown_model_is_404(server):
    client, _ = server
    error = _assert_error(_complete(client, model="aa"), 404)
    assert error["code"] == "model_not_found" and "`a`" in error["message"]
    chat = {"model": "zzz", "messages": [{"role": "user", "content": "hi"}]}
    _assert_error(client.post("/v1/chat/completions", json=chat), 404)


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


def _wait_for(condition, what):
    """Poll until `condition()` holds (a guard against a hang, not a timing assertion)."""
    deadline = time.monotonic() + 120
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def _in_threads(call, n):
    """Start `call` n times in threads; returns (threads, results appended as they end)."""
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(call())) for _ in range(n)]
    for thread in threads:
        thread.start()
    return threads, results


@pytest.mark.parametrize("replace", [False, True])
def test_unloading_an_adapter_under_load_loses_no_request(server, replace):
    """16 accepted completions race 8 unloads of their adapter (and, with `replace`, a load of
    the same name): every request ends 200 with the adapter's own answer or a 4xx naming it.
    The engine is held still (the host's compute lock) until every request is accepted, so the
    unload always lands while all of them are in flight."""
    client, state = server
    body = {"lora_name": "busy", "lora_path": "good"}
    assert client.post("/v1/load_lora_adapter", json=body).status_code == 200
    want = _complete(client, model="busy", max_tokens=6).json()["choices"][0]["text"]
    with state.host.lock:  # the engine computes nothing meanwhile
        requests, answers = _in_threads(lambda: _complete(client, model="busy", max_tokens=6), 16)
        _wait_for(lambda: state.host.holds("busy") == 16, "the requests were not accepted")
        unload = {"lora_name": "busy"}
        callers, unloads = _in_threads(
            lambda: client.post("/v1/unload_lora_adapter", json=unload), 8
        )
        _wait_for(lambda: len(unloads) == 7, "seven unloads should be refused at once")
        for refused in unloads:
            assert "`busy`" in _assert_error(refused, 404)["message"]
        late = _assert_error(_complete(client, model="busy"), 404)["message"]
        assert late == "The model `busy` is being unloaded; it takes no new requests."
        if replace:  # the name is not free until the running requests have ended
            again = client.post("/v1/load_lora_adapter", json={**body, "lora_path": "other"})
            assert (
                "`busy` is still being unloaded (16 requests"
                in _assert_error(again, 409)["message"]
            )
        assert len(unloads) == 7  # the accepted unload waits for the 16 requests
    for thread in requests + callers:
        thread.join(timeout=120)
    assert [a.status_code for a in answers] == [200] * 16
    assert {a.json()["choices"][0]["text"] for a in answers} == {want}  # the adapter's answer
    assert sorted(u.status_code for u in unloads) == [200] + [404] * 7
    assert "busy" not in state.host.lora.peft_config and state.host.holds("busy") == 0
    if replace:
        body = {"lora_name": "busy", "lora_path": "other"}
        assert client.post("/v1/load_lora_adapter", json=body).status_code == 200
        other = _complete(client, model="busy", max_tokens=6).json()["choices"][0]["text"]
        assert other != want
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "busy"}).status_code == 200
    assert _complete(client).status_code == 200  # the server still serves
