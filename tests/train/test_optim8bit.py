"""AdamW8bit (bitsandbytes' block-wise 8-bit moments) against fp32 AdamW's math: the state's
size, each step's update and quantization error, a short run's losses, and exact resume."""

from __future__ import annotations

import math

import bitsandbytes.functional as bnbf
import pytest
import torch
from test_loop import _crash_at_forward, lora_model, make_batches, quick, trainable

import lorakit
from conftest import make_tiny_llama
from lorakit.errors import ConfigError
from lorakit.jobs.run_config import validate_run_config
from lorakit.train import AdamW8bit, TrainConfig, train
from lorakit.train.checkpoint import latest_checkpoint, optimizer_from_flat, optimizer_to_flat
from lorakit.train.optim import build_optimizer, state_bytes

BLOCK = 256


def moments(optimizer: AdamW8bit, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 values the 8-bit state of `p` stands for."""
    s = optimizer.state[p]
    m = bnbf.dequantize_blockwise(
        s["state1"], absmax=s["absmax1"], code=s["qmap1"], blocksize=BLOCK
    )
    v = bnbf.dequantize_blockwise(
        s["state2"], absmax=s["absmax2"], code=s["qmap2"], blocksize=BLOCK
    )
    return m, v


def code_step(code: torch.Tensor) -> float:
    """The widest gap between neighbouring code values, as a fraction of a block's absmax: one
    quantization step where the code is coarsest. (bitsandbytes rounds to the nearest code, up
    to near-ties, so its errors stay near half of this.)"""
    return code.sort().values.diff().max().item()


def block_absmax(t: torch.Tensor) -> torch.Tensor:
    """Each value's block maximum magnitude, broadcast back to the values."""
    flat = t.reshape(-1)
    pad = torch.nn.functional.pad(flat.abs(), (0, -flat.numel() % BLOCK))
    return pad.view(-1, BLOCK).amax(1).repeat_interleave(BLOCK)[: flat.numel()].view(t.shape)


def test_public_names():
    assert lorakit.AdamW8bit is AdamW8bit and issubclass(AdamW8bit, torch.optim.Optimizer)


def test_each_step_is_adamw_on_the_dequantized_moments_and_requantizes_within_a_code_step():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3000))  # not a multiple of the block: a short last block
    lr, (b1, b2), eps, wd = 1e-2, (0.9, 0.999), 1e-8, 0.1
    opt = AdamW8bit([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    m_prev = v_prev = torch.zeros(3000)
    for step in range(1, 21):
        g = torch.randn(3000) * (1 + step % 3)
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        m_ref = b1 * m_prev + (1 - b1) * g
        v_ref = b2 * v_prev + (1 - b2) * g * g
        denom = v_ref.sqrt() / math.sqrt(1 - b2**step) + eps
        p_ref = before * (1 - lr * wd) - lr / (1 - b1**step) * m_ref / denom
        assert torch.allclose(p.detach(), p_ref, rtol=1e-5, atol=1e-6), step
        m_prev, v_prev = moments(opt, p)
        state = opt.state[p]
        for got, want, code in ((m_prev, m_ref, "qmap1"), (v_prev, v_ref, "qmap2")):
            error = (got - want).abs()
            assert error.le(block_absmax(want) * code_step(state[code])).all(), (step, code)
            assert error.max() > 0  # the moments are really stored in 8 bits
    assert state["step"] == 20


def test_state_memory_is_at_most_0_3_of_fp32_adamw():
    """LoRA r=8 on every projection of a one-layer Llama of the built-in model's width (576;
    k/v 288 wide here), the same parameters under both optimizers after one step."""
    base = make_tiny_llama(hidden=576, layers=1)
    config = lorakit.LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False)
    model = lorakit.get_peft_model(base, config)
    used = {}
    for kind in ("adamw", "adamw_8bit"):
        optimizer, params = build_optimizer(model, TrainConfig(lr=1e-3, optimizer=kind))
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.step()
        used[kind] = state_bytes(optimizer)
    sizes = [p.numel() for p in params]
    # fp32: two fp32 moments and a 4-byte step per tensor; 8-bit: two bytes per value, two fp32
    # scales per 256-value block, and the two 256-entry fp32 code maps, shared by all tensors
    assert used["adamw"] == sum(8 * n + 4 for n in sizes)
    assert used["adamw_8bit"] == sum(2 * n + 8 * math.ceil(n / BLOCK) for n in sizes) + 2048
    assert used["adamw_8bit"] <= 0.3 * used["adamw"]  # about 0.26 here


def test_a_short_run_tracks_fp32_adamw(tmp_path):
    batches = make_batches(4)
    losses = {}
    for kind in ("adamw", "adamw_8bit"):
        model = lora_model(dropout=0.0)
        config = quick(max_steps=12, grad_accum_steps=1, lr=3e-2, optimizer=kind)
        losses[kind] = train(model, None, batches, None, config, tmp_path / kind).losses
    gap = max(abs(a - b) for a, b in zip(losses["adamw"], losses["adamw_8bit"], strict=True))
    assert gap < 0.02, (gap, losses)  # losses ~4.9 falling by ~0.15; the first step is equal
    assert losses["adamw_8bit"][-1] < losses["adamw_8bit"][0] - 0.05


def test_resume_after_crash_is_bitwise_identical(tmp_path):
    batches = make_batches(6)
    config = quick(save_every=4, optimizer="adamw_8bit")
    straight = lora_model()
    expected = train(straight, None, batches, None, config, tmp_path / "a")
    crashed = lora_model()
    handle = _crash_at_forward(crashed, 9)  # step 5's first forward
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(crashed, None, batches, None, config, tmp_path / "b")
    handle.remove()
    checkpoint = latest_checkpoint(tmp_path / "b" / "checkpoints")
    assert checkpoint.name == "step-00000004"
    resumed = lora_model()
    got = train(resumed, None, batches, None, config, tmp_path / "b", resume="auto")
    assert got.losses == expected.losses
    for name, value in trainable(straight).items():
        assert torch.equal(value, trainable(resumed)[name]), name


def test_state_round_trips_through_flat_tensors_keeping_dtypes():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(600)), torch.nn.Parameter(torch.randn(40, 8))]
    first = AdamW8bit(params, lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)
    first.step()
    tensors, meta = optimizer_to_flat(first)
    assert tensors["state.0.state1"].dtype == torch.uint8 and meta["scalars"]["0"]["step"] == 1
    assert {k.split(".", 2)[2] for k in tensors} == {
        "state1",
        "state2",
        "absmax1",
        "absmax2",
        "qmap1",
        "qmap2",
    }
    second = AdamW8bit(params, lr=1e-2)
    optimizer_from_flat(second, tensors, meta)
    for p in params:
        for key, value in first.state[p].items():
            if torch.is_tensor(value):
                assert value.dtype == second.state[p][key].dtype
                assert torch.equal(value, second.state[p][key]), key


def test_run_config_selects_it_and_refuses_it_without_bitsandbytes(monkeypatch):
    run = validate_run_config({"train": {"optimizer": "adamw_8bit"}})
    assert run.train.optimizer == "adamw_8bit"
    assert validate_run_config({}).train.optimizer == "adamw"
    with pytest.raises(ConfigError, match="adamw, adamw_8bit|adamw_8bit"):
        validate_run_config({"train": {"optimizer": "adam8"}})
    monkeypatch.setattr("lorakit.jobs.run_config.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"train.optimizer: adamw_8bit needs bitsandbytes"):
        validate_run_config({"train": {"optimizer": "adamw_8bit"}})
