"""A mixture of experts end to end: `lorakit train` on a tiny Qwen3-MoE folder (LoRA on the
attention and the fused experts, the router load-balancing loss in metrics.jsonl), `lorakit
estimate` on the same config, then the server answering two adapters on that base."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml

from lorakit.cli import main
from moe_support import save_tiny_moe


def _config(folder: Path, base: Path, out: Path, seed: int) -> str:
    data = {
        "output_dir": str(out),
        "model": {"name_or_path": str(base)},
        "lora": {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["q_proj", "v_proj"],
            "target_parameters": ["gate_up_proj", "down_proj"],
        },
        "data": {"dataset": "identity", "limit": 8, "max_length": 64},
        "train": {
            "max_steps": 2,
            "batch_size": 4,
            "lr": 5e-2,
            "seed": seed,
            "precision": "fp32",
            "progress": "none",
            "tensorboard": False,
            "plots": False,
        },
    }
    path = folder / f"run{seed}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two adapters trained by `lorakit train` on one tiny MoE base (two seeds)."""
    root = tmp_path_factory.mktemp("moe")
    base = save_tiny_moe(root / "base")
    runs = {}
    for seed in (1, 2):
        out = root / f"run{seed}"
        assert main(["train", _config(root, base, out, seed)]) == 0
        runs[f"a{seed}"] = out
    return root, base, runs


def test_train_logs_the_router_loss_and_saves_expert_adapters(trained):
    root, _, runs = trained
    rows = [json.loads(line) for line in (runs["a1"] / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "train"]
    assert len(steps) == 2 and all(r["aux_loss"] > 1.0 for r in steps)
    saved = json.loads((runs["a1"] / "final" / "adapter_config.json").read_text())
    assert sorted(saved["target_parameters"]) == ["down_proj", "gate_up_proj"]
    from safetensors.torch import load_file

    keys = load_file(str(runs["a1"] / "final" / "adapter_model.safetensors"))
    assert any("experts" in k for k in keys)


def test_estimate_counts_the_expert_lora_and_quantized_experts(trained, capsys):
    root, _, _ = trained
    config = str(root / "run1.yaml")
    assert main(["estimate", config, "model.quantization=nf4"]) == 0
    out = capsys.readouterr().out
    # 2 layers x 4 experts x (64x32 + 32x32 ... ): the expert tensors, and their LoRA
    assert " in experts)" in out and " on expert parameters)" in out


@contextlib.contextmanager
def live_moe_client(base: Path, adapters: dict[str, Path]) -> Iterator:
    """(httpx client, ServerState) of a server over `base` with `adapters` loaded."""
    from lorakit.models import load_model, load_tokenizer
    from lorakit.serve.main import build_state
    from serve_support import live_client

    state = build_state(
        load_model(str(base)),
        load_tokenizer(str(base)),
        base_name="moe-base",
        adapters=adapters,
        max_batch=4,
        threads=1,
    )
    try:
        with live_client(state) as client:
            yield client, state
    finally:
        state.engine.shutdown()


def test_serve_answers_two_adapters_on_the_moe_base(trained):
    _, base, runs = trained
    adapters = {name: run / "final" for name, run in runs.items()}
    with live_moe_client(base, adapters) as (client, state):
        assert state.host.one_adapter_per_batch  # requests are grouped by adapter

        def ask(name):
            body = {"model": name, "prompt": "Hello", "max_tokens": 6, "temperature": 0}
            return client.post("/v1/completions", json=body)

        with ThreadPoolExecutor(4) as pool:  # both adapters waiting at once
            responses = dict(zip(adapters, pool.map(ask, list(adapters)), strict=True))
        assert all(r.status_code == 200 for r in responses.values()), responses
        answers = {name: r.json()["choices"][0]["text"] for name, r in responses.items()}
    # each answer is the greedy continuation of its own adapter, computed without the server
    from lorakit import LoraModel
    from lorakit.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(base))
    ids = torch.tensor([tokenizer("Hello")["input_ids"]])
    for name, folder in adapters.items():
        model = LoraModel.from_pretrained(load_model(str(base)), folder)
        out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
        assert answers[name] == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
