"""LoRA invariants: zero B is the identity, merge/unmerge round trip, gradients only in adapters."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import make_tiny_gpt2, make_tiny_llama
from lorakit import LoraConfig, LoraLinear, get_peft_model

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_fresh_adapter_gives_exactly_the_base_output(tiny_llama, init):
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        expected = tiny_llama(input_ids=ids).logits
        model = get_peft_model(
            tiny_llama, LoraConfig(r=4, target_modules=ALL, init_lora_weights=init)
        )
        assert torch.equal(model(input_ids=ids).logits, expected)


def test_kaiming_a_and_zero_b_at_init(tiny_llama):
    model = get_peft_model(tiny_llama, LoraConfig(r=8, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    a, b = layer.lora_weights("default")
    assert b.abs().sum() == 0
    # kaiming_uniform with a=sqrt(5) draws from U(-1/sqrt(in), 1/sqrt(in)), in = 32
    assert a.abs().max() <= 1 / 32**0.5 and a.std() > 0.05


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_gpt2])
def test_merge_then_unmerge_restores_base_weights(make):
    base = make()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(
        base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        model.merge_adapter()
        merged = model(input_ids=ids).logits
        model.unmerge_adapter()
    assert torch.allclose(merged, unmerged, atol=1e-5)
    after = model.unload().state_dict()
    for key, value in before.items():
        assert torch.allclose(after[key], value, atol=1e-6), key


def test_only_adapter_params_get_gradients_and_step_changes_no_base_weight(tiny_llama):
    model = get_peft_model(tiny_llama, LoraConfig(r=4, target_modules=ALL, lora_dropout=0.1))
    model.train()
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (2, 9))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)
    optimizer.step()
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name


def test_disable_adapter_gives_base_output(tiny_llama):
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        expected = tiny_llama(input_ids=ids).logits
        model = get_peft_model(
            tiny_llama, LoraConfig(r=4, target_modules=ALL, init_lora_weights=False)
        )
        assert not torch.allclose(model(input_ids=ids).logits, expected)
        with model.disable_adapter():
            assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-6)
        assert not torch.allclose(model(input_ids=ids).logits, expected)


def test_zero_dropout_adds_no_dropout_module(tiny_llama):
    model = get_peft_model(tiny_llama, LoraConfig(r=4, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.lora_dropout["default"], nn.Identity)


def test_tutorial_program_runs_and_a_step_updates_only_lora(capsys):
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 10))
    config = LoraConfig(r=4, lora_alpha=32, lora_dropout=0.1, target_modules=["Linear"])
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    # 2 layers: A (4x128) + B (256x4) and A (4x256) + B (10x4) = 512+1024+1024+40 = 2600 trainable;
    # all = 2600 + base (128*256+256 + 256*10+10 = 35,594) = 38,194
    assert capsys.readouterr().out.strip() == (
        "trainable params: 2,600 || all params: 38,194 || trainable%: 6.8074"
    )
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = nn.functional.cross_entropy(model(torch.randn(8, 128)), torch.randint(0, 10, (8,)))
    loss.backward()
    optimizer.step()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    # B starts at zero, so A's gradient (B^T @ upstream) is zero on the first step: only B moves
    assert sorted(changed) == sorted(k for k in before if "lora_B" in k)


def test_mixed_rows_equal_rows_run_alone(tiny_llama):
    model = get_peft_model(tiny_llama, LoraConfig(r=4, target_modules=ALL, init_lora_weights=False))
    model.add_adapter(
        "b", LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    names = ["b", "default", None, "b"]
    ids = torch.randint(0, 128, (4, 6))
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        for row, name in enumerate(names):
            if name is None:
                with model.disable_adapter():
                    alone = model(input_ids=ids[row : row + 1]).logits
            else:
                model.set_adapter(name)
                alone = model(input_ids=ids[row : row + 1]).logits
            assert torch.allclose(mixed[row], alone[0], atol=1e-5)


def test_lora_linear_refuses_unsupported_layer():
    with pytest.raises(TypeError, match="LoRA cannot wrap Conv2d"):
        LoraLinear(nn.Conv2d(3, 3, 3))


def test_safe_merge_refuses_non_finite(tiny_llama):
    model = get_peft_model(tiny_llama, LoraConfig(r=2, target_modules=["q_proj"]))
    before = tiny_llama.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    with torch.no_grad():
        model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.fill_(
            float("inf")
        )
    with pytest.raises(ValueError, match="non-finite"):
        model.merge_and_unload(safe_merge=True)
    assert torch.equal(tiny_llama.model.layers[0].self_attn.q_proj.base_layer.weight, before)


def test_half_precision_base_keeps_fp32_adapters_and_its_own_output_dtype(tiny_llama):
    model = get_peft_model(tiny_llama.to(torch.bfloat16), LoraConfig(r=4, target_modules=ALL))
    a, b = model.base_model.model.model.layers[0].self_attn.q_proj.lora_weights("default")
    assert a.dtype == b.dtype == torch.float32
    logits = model(input_ids=torch.randint(0, 128, (1, 4))).logits
    assert logits.dtype == torch.bfloat16


@pytest.mark.parametrize("grad", [True, False])
def test_autocast_with_and_without_grad(tiny_llama, grad):
    model = get_peft_model(tiny_llama, LoraConfig(r=4, target_modules=ALL, init_lora_weights=False))
    ids = torch.randint(0, 128, (1, 6))
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    assert torch.allclose(logits.float(), reference, atol=0.1)  # bf16 rounding through 2 layers
