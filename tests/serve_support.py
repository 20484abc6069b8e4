"""Shared pieces for the serving tests: a tiny tokenizer, tiny adapters, a live loopback server.

No tests live here; the serving and web page tests import it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from conftest import make_tiny_llama

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB = 260  # 256 byte tokens + 3 special tokens, rounded up
BASE_NAME = "tiny-base"


def make_tokenizer():
    """A byte-level tokenizer (one token per byte, no merges) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML
    tokenizer.model_max_length = 256
    return tokenizer


def make_model():
    """The tiny Llama the serving tests serve (same weights on every call)."""
    return make_tiny_llama(vocab_size=VOCAB)


def make_adapters(root: Path, names: list[str], *, template: str | None = None) -> dict[str, Path]:
    """Save one random (non-zero) adapter per name under root/<name>, each with its own seed."""
    from lorakit import LoraConfig, get_peft_model

    paths = {}
    for seed, name in enumerate(names, start=1):
        config = LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            init_lora_weights=False,
        )
        model = make_model()
        torch.manual_seed(seed)
        lora_model = get_peft_model(model, config)
        with torch.no_grad():  # make each adapter change the greedy tokens visibly
            for param in lora_model.parameters():
                if param.requires_grad:
                    param.mul_(2.0)
        lora_model.chat_template = template
        lora_model.save_pretrained(root / name)
        paths[name] = root / name
    return paths


@contextlib.contextmanager
def live_server(app) -> Iterator[str]:
    """Run an ASGI app with uvicorn on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextlib.contextmanager
def live_client(
    state, *, headers: dict | None = None, timeout: float = 30, **app_options
) -> Iterator:
    """An httpx client of `create_app(state, **app_options)` served on loopback."""
    import httpx

    from lorakit.serve.app import create_app

    app = create_app(state, **app_options)
    with live_server(app) as url, httpx.Client(base_url=url, headers=headers, timeout=timeout) as c:
        yield c
