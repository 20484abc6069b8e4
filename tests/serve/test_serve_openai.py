"""The server through the official `openai` client, on 127.0.0.1 with a tiny model and adapters."""

from __future__ import annotations

import asyncio

import pytest

from lorakit.serve import build_state
from lorakit.serve.app import create_app
from serve_support import BASE_NAME, live_server, make_adapters, make_model, make_tokenizer

openai = pytest.importorskip("openai")

KEY = "sk-test-key"
ADAPTERS = ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    paths = make_adapters(tmp_path_factory.mktemp("adapters"), ADAPTERS)
    state = build_state(
        make_model(), make_tokenizer(), base_name=BASE_NAME, adapters=paths, max_batch=16, threads=1
    )
    try:
        with live_server(create_app(state, api_key=KEY)) as url:
            yield url, state
    finally:
        state.engine.shutdown()


def _client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, timeout=30, max_retries=0)


def test_models_completion_chat_and_streaming(server):
    url, _ = server
    client = _client(url)
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {BASE_NAME, *ADAPTERS}
    assert models["a"].model_extra["parent"] == BASE_NAME
    assert models[BASE_NAME].model_extra["parent"] is None

    done = client.completions.create(model="a", prompt="Hello", max_tokens=5, temperature=0)
    assert done.object == "text_completion" and done.model == "a"
    assert done.choices[0].finish_reason in ("stop", "length")
    assert done.usage.prompt_tokens == 5 and 1 <= done.usage.completion_tokens <= 5

    chat = client.chat.completions.create(
        model="b", messages=[{"role": "user", "content": "Hi there"}], max_tokens=6, temperature=0
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens > len("Hi there")  # the chat template was applied

    pieces = client.completions.create(
        model="a", prompt="Hello", max_tokens=5, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in pieces) == done.choices[0].text

    chunks = list(
        client.chat.completions.create(
            model="b",
            messages=[{"role": "user", "content": "Hi there"}],
            max_tokens=6,
            temperature=0,
            stream=True,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason


def test_unknown_model_is_openai_not_found(server):
    url, _ = server
    with pytest.raises(openai.NotFoundError) as caught:
        _client(url).completions.create(model="nope", prompt="x", max_tokens=2)
    assert caught.value.body["code"] == "model_not_found"


def test_wrong_key_is_rejected(server):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0, timeout=10)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_64_concurrent_requests_match_solo_runs(server):
    """64 requests over the base and 4 adapters at once; each equals its solo greedy run."""
    url, state = server
    models = [BASE_NAME, *ADAPTERS]
    jobs = [(models[i % 5], f"request {i} " + "xyz"[: i % 4], 4 + i % 5) for i in range(64)]
    client = _client(url)
    steps_before = state.engine.steps
    solo = [
        client.completions.create(model=m, prompt=p, max_tokens=n, temperature=0).choices[0].text
        for m, p, n in jobs
    ]
    solo_steps = state.engine.steps - steps_before

    async def all_at_once() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, timeout=60, max_retries=0)
        calls = [
            aclient.completions.create(model=m, prompt=p, max_tokens=n, temperature=0)
            for m, p, n in jobs
        ]
        answers = await asyncio.wait_for(asyncio.gather(*calls), timeout=120)
        await aclient.close()
        return [answer.choices[0].text for answer in answers]

    steps_before = state.engine.steps
    together = asyncio.run(all_at_once())
    assert together == solo
    assert state.engine.steps - steps_before < solo_steps / 4  # rows really shared steps
    assert len(set(solo)) > 16  # the adapters and prompts really differ
