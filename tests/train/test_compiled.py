"""train.compile: the decoder blocks traced without graph breaks, one compilation for batches of
every length, the same losses as the eager loop, and a resumed compiled run equal to an
uninterrupted one.

The fast tests trace with dynamo and AOTAutograd but skip inductor's code generation
(`BACKEND = "aot_eager"`), which is what graph breaks and recompilations are decided by; the
slow test runs inductor itself."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import make_tiny_llama
from lorakit import LoraConfig, get_peft_model
from lorakit.errors import ConfigError
from lorakit.ops import causal_lm_loss
from lorakit.train import TrainConfig, train
from lorakit.train import compiled as compiled_module
from lorakit.train.compiled import Compiled, compile_counts, decoder_blocks, resolve_compile

LENGTHS = [12, 20, 9, 33, 27, 18, 40, 25, 14, 30]  # ten steps, ten lengths
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def aot_eager(monkeypatch):
    """Trace with dynamo + AOTAutograd, no code generation; a fresh dynamo cache."""
    monkeypatch.setattr(compiled_module, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def lora_model(dropout: float = 0.0):
    base = make_tiny_llama()
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS, init_lora_weights=False
    )
    return get_peft_model(base, config)


def varying_batches(lengths=LENGTHS, rows: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    batches = []
    for length in lengths:
        ids = torch.randint(0, 128, (rows, length), generator=g)
        labels = ids.clone()
        labels[:, :2] = -100
        batches.append({"input_ids": ids, "labels": labels})
    return batches


def config(**overrides) -> TrainConfig:
    base = dict(
        precision="fp32",
        lr=1e-2,
        max_steps=len(LENGTHS),
        shuffle=False,
        progress="none",
        tensorboard=False,
        plots=False,
        device="cpu",
    )
    return TrainConfig(**{**base, **overrides})


def test_resolve_compile_auto_compiles_on_cuda_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_compile("auto", cuda) is True
    assert resolve_compile("auto", cpu) is False  # measured slower than eager on a CPU
    assert resolve_compile(True, cpu) is True
    assert resolve_compile(False, cuda) is False


def test_decoder_blocks_are_the_models_repeated_layers():
    model = lora_model()
    blocks = decoder_blocks(model)
    assert [type(b).__name__ for b in blocks] == ["LlamaDecoderLayer"] * 2
    assert blocks[1] is model.get_base_model().model.layers[1]


def test_blocks_trace_without_graph_breaks_and_compile_once_for_ten_lengths(aot_eager):
    model = lora_model(dropout=0.1).train()  # adapter dropout inside the blocks
    compiled = Compiled(model)
    before = compile_counts()
    graphs = []
    for batch in varying_batches():
        with torch.autocast("cpu", dtype=torch.bfloat16), compiled.active():
            loss, n = causal_lm_loss(model, batch)
        (loss / n).backward()
        graphs.append(compile_counts()["graphs"] - before["graphs"])
    after = compile_counts()
    assert after["graph_breaks"] - before["graph_breaks"] == 0
    assert after["recompiles"] - before["recompiles"] == 0
    # the first block's input needs no gradient, the others' do: two graphs, both at step 1
    assert graphs == [2] * len(LENGTHS)
    assert all(b._compiled_call_impl is None for b in compiled.blocks)  # eager outside


@pytest.mark.slow  # ~25 s of tracing on 2 cores
def test_qlora_blocks_break_only_at_the_quantized_matmuls(aot_eager):
    from lorakit.quant import prepare_model_for_kbit_training, quantize_model

    base = make_tiny_llama()
    quantize_model(base, "nf4", double_quant=True, compute_dtype=torch.bfloat16)
    prepare_model_for_kbit_training(base, gradient_checkpointing=False)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS)
    model = get_peft_model(base, config).train()
    compiled = Compiled(model)
    before = compile_counts()
    for batch in varying_batches(LENGTHS[:4]):
        with torch.autocast("cpu", dtype=torch.bfloat16), compiled.active():
            loss, n = causal_lm_loss(model, batch)
        (loss / n).backward()
    after = compile_counts()
    assert after["recompiles"] == before["recompiles"]
    # the dequantizing matmul runs eagerly: one break per quantized layer (7 per block) and
    # one where the block's compiled code resumes after the last of them, traced once
    breaks = after["graph_breaks"] - before["graph_breaks"]
    assert 0 < breaks <= 8 * len(compiled.blocks)


@pytest.mark.slow  # ~20 CPU-s of tracing on 2 cores
def test_compiled_training_equals_eager_training(aot_eager, tmp_path, capsys):
    off, on = config(compile=False), config(compile=True, progress="plain")
    eager = train(lora_model(), None, varying_batches(), None, off, tmp_path / "e")
    ran = train(lora_model(), None, varying_batches(), None, on, tmp_path / "c")
    # the same graph with AOTAutograd's own backward: equal to fp32 rounding
    torch.testing.assert_close(ran.losses, eager.losses, rtol=1e-5, atol=1e-6)
    log = capsys.readouterr().err
    assert "compile: 2 x LlamaDecoderLayer" in log
    assert "compile: first step" in log
    assert "compile: 2 graphs, 0 recompilations, 0 graph breaks over the run" in log


@pytest.mark.slow  # ~40 CPU-s of tracing on 2 cores
def test_resumed_compiled_run_equals_uninterrupted_one(aot_eager, tmp_path):
    batches = varying_batches()
    whole = train(lora_model(0.1), None, batches, None, config(compile=True), tmp_path / "w")
    half = config(compile=True, max_steps=len(LENGTHS), save_every=5)
    first = tmp_path / "r"
    with pytest.raises(_Stop):
        train(_stop_after(lora_model(0.1), 5), None, batches, None, half, first)
    resumed = train(lora_model(0.1), None, batches, None, half, first, resume="auto")
    assert resumed.losses == whole.losses


def test_compile_true_on_a_model_without_blocks_is_refused(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="train.compile: false"):
        train(model, None, varying_batches()[:1], None, config(compile=True), tmp_path)


@pytest.mark.slow  # inductor's code generation: minutes on 2 cores
def test_inductor_steps_match_eager_within_bf16_tolerance(tmp_path, capsys):
    """Inductor's generated kernels (fused, reordered) against eager, bf16 autocast."""
    torch._dynamo.reset()
    eager = train(
        lora_model(), None, varying_batches(), None, config(precision="bf16"), tmp_path / "e"
    )
    ran = train(
        lora_model(),
        None,
        varying_batches(),
        None,
        config(precision="bf16", compile=True, progress="plain"),
        tmp_path / "c",
    )
    # bf16 autocast: inductor fuses and reorders bf16 elementwise work (2^-8 relative steps)
    torch.testing.assert_close(ran.losses, eager.losses, rtol=2e-2, atol=2e-2)
    assert "0 recompilations, 0 graph breaks" in capsys.readouterr().err


class _Stop(Exception):
    pass


def _stop_after(model, steps: int):
    """The model raises at the forward after `steps` steps (one forward each)."""
    calls = {"n": 0}

    def hook(module, args, kwargs):
        calls["n"] += 1
        if calls["n"] > steps:
            raise _Stop

    model.get_base_model().model.register_forward_pre_hook(hook, with_kwargs=True)
    return model


def test_a_run_may_resume_with_compile_switched():
    from lorakit.train.checkpoint import resume_differences

    saved = config(compile=False).model_dump(mode="json")
    del saved["compile"]  # a checkpoint written before the setting existed
    assert resume_differences(saved, config(compile=True).model_dump(mode="json")) == []
