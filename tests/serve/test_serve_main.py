"""Putting a server together (serve/main.py): the loopback check and the bind it guards, the
context length and end-of-sequence ids, build_state's checks, the printed model ids, and
`serve_main` in a subprocess."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from lorakit.errors import ConfigError
from lorakit.serve import build_state, check_bind, serve_main
from lorakit.serve.main import context_length, eos_ids, is_loopback
from serve_support import BASE_NAME, make_adapters, make_model, make_tokenizer


def test_loopback_in_every_spelling():
    for host in ("127.1", "::ffff:127.0.0.1", "0x7f.0.0.1", "2130706433", "[::1]", "127.0.0.2"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "::ffff:10.0.0.1", "10.1", "example.com", "127.0.0.1 x"):
        assert not is_loopback(host), host


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


def test_serve_prints_the_model_ids_it_serves():
    from lorakit.serve.main import served_models

    text = served_models("smollm2-135m-instruct", ["lumi", "pirate"], "127.0.0.1", 8000)
    assert "http://127.0.0.1:8000/v1" in text
    assert [line.split()[0] for line in text.splitlines()[1:]] == [
        "smollm2-135m-instruct",
        "lumi",
        "pirate",
    ]


def test_context_length_is_the_limit_given_else_the_model_s():
    tokenizer = make_tokenizer()  # model_max_length 256
    model = SimpleNamespace(config=SimpleNamespace(n_positions=1024))
    assert context_length(model, tokenizer) == 1024  # the model's position limit first
    assert context_length(model, tokenizer, limit=100) == 100
    with pytest.raises(ConfigError, match="max_model_len must be >= 2, got 1"):
        context_length(model, tokenizer, limit=1)
    no_limit = SimpleNamespace(model_max_length=int(1e30))  # transformers' "no limit"
    with pytest.raises(ConfigError, match="cannot tell the model's context length"):
        context_length(SimpleNamespace(config=None), no_limit)


def test_eos_ids_join_the_tokenizer_s_and_the_generation_config_s():
    tokenizer = SimpleNamespace(eos_token_id=5)
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[5, 7, None]))
    assert eos_ids(model, tokenizer) == {5, 7}  # None and the repeated 5 dropped
    assert eos_ids(SimpleNamespace(), SimpleNamespace(eos_token_id=None)) == set()
    # the tiny tokenizer's <|im_end|> is id 256 (the first after the 256 byte tokens); the
    # tiny Llama's generation config keeps LlamaConfig's default eos_token_id, 2
    assert make_tokenizer().eos_token_id == 256
    assert eos_ids(make_model(), make_tokenizer()) == {256, 2}


def test_build_state_checks_runtime_loading_and_the_root(tmp_path):
    with pytest.raises(ConfigError, match="--allow-runtime-loading needs --adapters-root DIR"):
        build_state(make_model(), make_tokenizer(), base_name=BASE_NAME, allow_runtime_loading=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="--adapters-root .*file: not a directory"):
        build_state(
            make_model(), make_tokenizer(), base_name=BASE_NAME, adapters_root=tmp_path / "file"
        )


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
