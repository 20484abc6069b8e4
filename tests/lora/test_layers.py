"""The LoRA layer: its formula written out (no peft), and its invariants: zero B is the identity,
merge/unmerge round trip, gradients only in adapters."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import make_tiny_gpt2, make_tiny_llama
from lorakit import LoraConfig, LoraLinear, get_peft_model
from lorakit.lora.layers import LoraEmbedding

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# ---------------------------------------------------------------- the formula, without peft
# For a base weight W (out × in), A (r × in), B (out × r):
#     forward(x) = base(x) + scaling · x Aᵀ Bᵀ,   delta_weight = scaling · B A
# with scaling = alpha / r (alpha / sqrt(r) with rslora); Conv1D and nn.Embedding store W as
# (in × out), so their delta_weight is (scaling · B A)ᵀ; an embedding looks A up by token id:
#     forward(ids) = base(ids) + scaling · embedding(ids, Aᵀ) Bᵀ.
# init_lora_weights=False makes A and B both random, so a zero update cannot pass.

IN, OUT, R, ALPHA = 6, 5, 4, 8
SCALINGS = [(False, ALPHA / R), (True, ALPHA / math.sqrt(R))]  # (use_rslora, scaling)
BASES = {
    "linear": lambda: nn.Linear(IN, OUT, dtype=torch.float64),
    "conv1d": lambda: Conv1D(OUT, IN).double(),  # Conv1D(nf=out, nx=in), weight (in, out)
    "embedding": lambda: nn.Embedding(IN, OUT, dtype=torch.float64),  # IN ids, OUT dims
}


def _layer(kind: str, use_rslora: bool) -> LoraLinear:
    torch.manual_seed(0)
    layer = LoraLinear(BASES[kind]())
    layer.update_layer("default", R, ALPHA, init_lora_weights=False, use_rslora=use_rslora)
    return layer


def _input(kind: str) -> torch.Tensor:
    if kind == "embedding":
        return torch.randint(0, IN, (3, 7))
    return torch.randn(3, 7, IN, dtype=torch.float64)


def _formula(layer: LoraLinear, x: torch.Tensor, scaling: float) -> torch.Tensor:
    a, b = layer.lora_weights("default")  # A (r × in), B (out × r)
    with torch.no_grad():
        if isinstance(layer, LoraEmbedding):
            return layer.base_layer(x) + scaling * F.embedding(x, a.T) @ b.T
        return layer.base_layer(x) + scaling * x @ a.T @ b.T


@pytest.mark.parametrize(("use_rslora", "scaling"), SCALINGS)
@pytest.mark.parametrize("kind", BASES)
def test_forward_is_base_plus_scaled_b_a_x(kind, use_rslora, scaling):
    layer = _layer(kind, use_rslora)
    a, b = layer.lora_weights("default")
    assert a.shape == (R, IN) and b.shape == (OUT, R) and b.abs().min() > 0
    assert layer.scaling["default"] == scaling
    x = _input(kind)
    with torch.no_grad():
        got = layer(x)
    torch.testing.assert_close(got, _formula(layer, x, scaling), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, layer.base_layer(x))


@pytest.mark.parametrize(("use_rslora", "scaling"), SCALINGS)
@pytest.mark.parametrize("kind", BASES)
def test_delta_weight_is_scaling_times_b_at_a(kind, use_rslora, scaling):
    layer = _layer(kind, use_rslora)
    a, b = layer.lora_weights("default")
    expected = (scaling * b @ a).detach()  # (out, in)
    if kind in ("conv1d", "embedding"):
        expected = expected.T  # the base weight's (in, out) layout
    assert layer.base_layer.weight.shape == expected.shape
    torch.testing.assert_close(layer.delta_weight("default"), expected.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", BASES)
def test_merge_adds_delta_weight_and_unmerge_takes_it_out(kind):
    layer = _layer(kind, False)
    before = layer.base_layer.weight.detach().clone()
    x = _input(kind)
    want = _formula(layer, x, ALPHA / R)
    layer.merge()
    merged = layer.base_layer.weight.detach().clone()
    torch.testing.assert_close(merged, before + layer.delta_weight("default").double())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want)  # merged: the base alone computes the formula
    layer.unmerge()  # merging computes in fp32
    torch.testing.assert_close(layer.base_layer.weight, before, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want)


def test_lora_linear_on_an_embedding_is_a_lora_embedding_with_peft_names():
    layer = LoraLinear(nn.Embedding(10, 4))
    assert type(layer) is LoraEmbedding
    layer.update_layer("default", 2, 4)
    assert sorted(k for k in layer.state_dict() if "lora" in k) == [
        "lora_embedding_A.default",
        "lora_embedding_B.default",
    ]
    assert type(copy.deepcopy(layer)) is LoraEmbedding


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


@pytest.mark.parametrize(("dropout", "deterministic"), [(0.0, True), (0.5, False)])
def test_zero_dropout_leaves_the_training_forward_deterministic(tiny_llama, dropout, deterministic):
    model = get_peft_model(
        tiny_llama,
        LoraConfig(r=4, target_modules=ALL, lora_dropout=dropout, init_lora_weights=False),
    )
    model.train()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        first, second = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.equal(first, second) is deterministic


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
