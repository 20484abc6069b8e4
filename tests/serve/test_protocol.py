"""Request bodies (serve/protocol.py): strict JSON types, ranges and the field named in each
400, through the server and on parse_body itself; errors in OpenAI's shape."""

from __future__ import annotations

import pytest
from test_app import AUTH, KEY, _assert_error, _complete

from lorakit.serve import build_state
from lorakit.serve.protocol import ApiError, ChatRequest, CompletionRequest, parse_body
from serve_support import (
    BASE_NAME,
    VOCAB,
    live_client,
    make_adapters,
    make_model,
    make_tokenizer,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The tiny model with adapter `a` (context 256) behind the API key, bodies up to 2 MB."""
    adapters = make_adapters(tmp_path_factory.mktemp("protocol"), ["a"])
    state = build_state(
        make_model(), make_tokenizer(), base_name=BASE_NAME, adapters=adapters, threads=1
    )
    try:
        with live_client(state, headers=AUTH, api_key=KEY, max_body_bytes=2 << 20) as client:
            yield client, state
    finally:
        state.engine.shutdown()


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


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    "content, param",
    [
        ({"stream": "yes"}, "stream"),
        ({"seed": 2**70}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"temperature": "0.5"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"max_tokens": 4.0}, "max_tokens"),
        ({"top_k": "5"}, "top_k"),
        ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ({"user": 5}, "user"),
        ('{"model": "a", "prompt": "x", "temperature": NaN}', "temperature"),
        ('{"model": "a", "prompt": "x", "top_p": Infinity}', "top_p"),
        ('{"model": "a", "prompt": "x", "seed": ' + "9" * 5000 + "}", None),
        ('{"model": "a", "prompt": ' + DEEP + "}", None),
        (DEEP, None),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 40 else None,
)
def test_bad_bodies_are_answered_4xx(server, content, param):
    client, _ = server
    if isinstance(content, dict):
        response = client.post(
            "/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 2, **content}
        )
    else:
        headers = {"content-type": "application/json"}
        response = client.post("/v1/completions", content=content, headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_parse_body_names_the_field_and_shows_what_was_given():
    with pytest.raises(ApiError) as error:
        parse_body(CompletionRequest, [1, 2])
    assert error.value.status == 400
    assert error.value.message == "the request body must be a JSON object"
    with pytest.raises(ApiError) as error:
        parse_body(CompletionRequest, {"prompt": "x"})
    assert error.value.param == "model"
    assert error.value.message == "model: Field required (given: nothing)"
    with pytest.raises(ApiError) as error:
        parse_body(CompletionRequest, {"model": "a", "prompt": "x", "temperature": "x" * 100})
    # repr("x" * 100) is 102 characters: its first 77 and "..." are shown (80 in all)
    shown = "'" + "x" * 76 + "..."
    assert error.value.message == f"temperature: Input should be a valid number (given: {shown})"
    nested = {"model": "a", "messages": [{"role": "user", "content": [{"type": "image"}]}]}
    with pytest.raises(ApiError) as error:
        parse_body(ChatRequest, nested)
    assert error.value.param == "messages.0.content.str"


def test_request_fields_as_the_engine_reads_them():
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    chat = parse_body(
        ChatRequest,
        {
            "model": "a",
            "messages": [{"role": "user", "content": parts}],
            "max_tokens": 5,
            "max_completion_tokens": 3,
            "stop": "END",
            "top_k": -1,
        },
    )
    assert chat.messages[0].text() == "ab"
    assert chat.token_budget() == 3  # max_completion_tokens before max_tokens
    assert chat.stop_strings() == ("END",) and chat.top_k_value() == 0  # -1: off
    completion = parse_body(CompletionRequest, {"model": "a", "prompt": [1, 2]})
    assert completion.max_tokens == 16 and completion.stop_strings() == ()  # OpenAI's default
    assert (completion.temperature, completion.top_p, completion.top_k_value()) == (1.0, 1.0, 0)


@pytest.mark.parametrize(
    "error, kind, code",
    [
        (ApiError(400, "bad"), "invalid_request_error", None),
        (ApiError(401, "no key"), "authentication_error", "invalid_api_key"),
        (ApiError(404, "no such model", param="model"), "invalid_request_error", "model_not_found"),
        (ApiError(404, "no route", code="unknown_url"), "invalid_request_error", "unknown_url"),
        (ApiError(404, "off"), "invalid_request_error", None),
        (ApiError(413, "too large"), "invalid_request_error", "request_too_large"),
        (ApiError(503, "busy"), "server_error", None),
    ],
)
def test_errors_in_openai_shape(error, kind, code):
    body = {"message": error.message, "type": kind, "param": error.param, "code": code}
    assert error.body() == {"error": body}
