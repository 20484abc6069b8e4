"""lorakit.quant: code tables, round-trip error, storage, QuantLinear, quantize_model, merge."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_codes import rms
from torch import nn

from conftest import make_tiny_llama
from lorakit import LoraConfig, LoraModel, get_peft_model
from lorakit.errors import ConfigError
from lorakit.quant import (
    QuantLinear,
    dequantize_model,
    merge_into_quantized,
    model_nbytes,
    prepare_model_for_kbit_training,
    quantize_model,
)


def test_round_trip_error_int8_below_nf4_below_fp4():
    """Relative RMS error of W ~ N(0, 1), 256 x 1024, per method.

    int8: step m/127 with m = max |w| over a row of 1024 (E[m] ~ 3.3), uniform rounding error,
    so rms ~ 3.3 / 127 / sqrt(12) = 0.0075 (measured 0.0079).
    4-bit: blocks of 64 have E[m] ~ 2.4; 16 evenly spaced levels on [-m, m] would give
    2 * 2.4 / 15 / sqrt(12) = 0.092. NF4 puts its levels at normal quantiles (measured 0.092);
    FP4 (E2M1) crowds levels near zero and leaves gaps of m/3 near the top (measured 0.106).
    Double quantization adds < 1e-4 to either.
    """
    weight = torch.randn(256, 1024)
    errors = {}
    for method, dq in [("int8", False), ("nf4", False), ("nf4", True), ("fp4", True)]:
        layer = QuantLinear.from_weight(weight, method=method, double_quant=dq)
        errors[method, dq] = rms(layer.dequantize(torch.float32) - weight)
    assert 0.006 < errors["int8", False] < 0.010
    assert 0.085 < errors["nf4", True] < 0.099
    assert 0.099 < errors["fp4", True] < 0.113
    assert errors["int8", False] < errors["nf4", True] < errors["fp4", True]
    assert abs(errors["nf4", True] - errors["nf4", False]) < 1e-4


@pytest.mark.parametrize(
    ("method", "double_quant", "bits"),
    [
        # 4 bits + one int8 absmax per 64 + one fp32 scale per 256 absmaxes + one fp32 offset
        ("nf4", True, 4 + 8 / 64 + 32 / (64 * 256) + 32 / (256 * 1024)),
        ("nf4", False, 4 + 32 / 64),  # 4 bits + one fp32 absmax per 64 weights = 4.5
        ("fp4", True, 4 + 8 / 64 + 32 / (64 * 256) + 32 / (256 * 1024)),
        ("int8", False, 8 + 32 / 1024),  # 8 bits + one fp32 absmax per row of 1024
    ],
)
def test_bits_per_parameter(method, double_quant, bits):
    layer = QuantLinear.from_weight(
        torch.randn(256, 1024), method=method, double_quant=double_quant
    )
    assert layer.bits_per_parameter() == pytest.approx(bits, abs=1e-9)
    if method == "nf4" and double_quant:
        assert layer.bits_per_parameter() == pytest.approx(4.127, abs=1e-3)


def test_odd_shapes_are_padded_and_restored():
    weight = torch.randn(5, 7)  # 35 weights: one zero-padded block of 64
    layer = QuantLinear.from_weight(weight, method="nf4")
    assert layer.weight_packed.numel() == 32
    restored = layer.dequantize(torch.float32)
    assert restored.shape == (5, 7)
    assert rms(restored - weight) < 0.15


@pytest.mark.parametrize("method", ["nf4", "fp4", "int8"])
def test_forward_is_linear_with_dequantized_weight(method):
    linear = nn.Linear(48, 20)
    layer = QuantLinear.from_linear(linear, method=method)
    x = torch.randn(3, 5, 48)
    expected = nn.functional.linear(x, layer.dequantize(), linear.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_bf16_compute_returns_input_dtype():
    layer = QuantLinear.from_weight(torch.randn(16, 64), method="nf4", compute_dtype=torch.bfloat16)
    assert layer.dequantize().dtype == torch.bfloat16
    x = torch.randn(2, 64)
    y = layer(x)
    assert y.dtype == torch.float32
    reference = x @ layer.dequantize(torch.float32).T
    # bf16 has an 8-bit mantissa: relative error per product ~2^-9, summed over 64 terms.
    assert rms(y - reference) / rms(reference) < 1e-2


def test_backward_matches_dequantized_weight_and_buffers_get_no_grad():
    layer = QuantLinear.from_weight(torch.randn(16, 64), torch.randn(16), method="nf4")
    x = torch.randn(4, 64, requires_grad=True)
    layer(x).pow(2).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    nn.functional.linear(x_ref, layer.dequantize(), layer.bias).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert [name for name, _ in layer.named_parameters()] == ["bias"]
    assert not layer.bias.requires_grad


def test_state_dict_holds_buffers_and_loads_into_a_fresh_layer(tmp_path):
    layer = QuantLinear.from_weight(torch.randn(32, 128), torch.randn(32), method="nf4")
    assert sorted(layer.state_dict()) == [
        "absmax_int8",
        "absmax_offset",
        "absmax_scale",
        "bias",
        "weight_packed",
    ]
    save_file(layer.state_dict(), tmp_path / "q.safetensors")
    fresh = QuantLinear(128, 32, method="nf4", bias=True)
    fresh.load_state_dict(load_file(tmp_path / "q.safetensors"))
    x = torch.randn(3, 128)
    assert torch.equal(fresh(x), layer(x))


def test_to_bfloat16_changes_compute_dtype_but_keeps_scales_fp32():
    layer = QuantLinear.from_weight(torch.randn(16, 128), torch.randn(16), method="nf4")
    before = layer.dequantize(torch.float32)
    layer.to(torch.bfloat16)
    assert layer.compute_dtype == torch.bfloat16
    assert layer.absmax_scale.dtype == layer.absmax_offset.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.dequantize(torch.float32), before)
    layer.float()
    assert layer.compute_dtype == torch.float32


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_store_quantizes_a_new_weight_as_a_fresh_layer_would(method):
    layer = QuantLinear.from_weight(
        torch.randn(16, 64), method=method, compute_dtype=torch.bfloat16
    )
    weight = torch.randn(16, 64)
    layer.store(weight)
    fresh = QuantLinear.from_weight(weight.bfloat16(), method=method)
    assert torch.equal(layer.dequantize(torch.float32), fresh.dequantize(torch.float32))
    with pytest.raises(ValueError, match=r"expected an \(16, 64\) weight, got shape \(64, 16\)"):
        layer.store(weight.T)


def test_unknown_method_is_a_config_error():
    with pytest.raises(ConfigError, match="did you mean `nf4`"):
        QuantLinear(8, 8, method="nf5")
    with pytest.raises(ConfigError, match="nf4, fp4, int8"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), "int4")


def test_quantize_model_llama_skips_lm_head_and_stays_close(tiny_llama):
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        reference = tiny_llama(ids).logits
    quantize_model(tiny_llama, "nf4")
    kinds = {name: type(m).__name__ for name, m in tiny_llama.named_modules()}
    assert kinds["lm_head"] == "Linear"
    assert kinds["model.layers.0.self_attn.q_proj"] == "QuantLinear"
    assert sum(kind == "QuantLinear" for kind in kinds.values()) == 2 * 7
    assert not any(p.requires_grad for n, p in tiny_llama.named_parameters() if "proj" in n)
    with torch.no_grad():
        logits = tiny_llama(ids).logits
    # NF4 weight noise is ~9% of each weight (test above); through 2 layers the logits move by
    # a few percent of their spread.
    assert rms(logits - reference) / reference.std().item() < 0.2


def test_quantize_model_gpt2_conv1d_and_tied_weights(tiny_gpt2):
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        reference = tiny_gpt2(ids).logits
    quantize_model(tiny_gpt2, "int8", skip=[])  # lm_head is tied to wte: left alone
    assert type(tiny_gpt2.lm_head).__name__ == "Linear"
    assert type(tiny_gpt2.transformer.h[0].attn.c_attn).__name__ == "QuantLinear"
    with torch.no_grad():
        logits = tiny_gpt2(ids).logits
    # int8 error ~0.3% of each weight: the logits barely move.
    assert rms(logits - reference) / reference.std().item() < 0.02


def test_quantized_model_state_dict_round_trip(tmp_path):
    model = quantize_model(make_tiny_llama(), "nf4")
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    torch.manual_seed(1)
    other = quantize_model(make_tiny_llama(layers=2), "nf4")
    for param in other.parameters():
        param.data.normal_()
    other.load_state_dict(load_file(tmp_path / "model.safetensors"))
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        assert torch.equal(other(ids).logits, model(ids).logits)


def test_model_nbytes_counts_quantized_storage():
    model = nn.Sequential(nn.Linear(1024, 256, bias=False))
    assert model_nbytes(model) == 256 * 1024 * 4
    quantize_model(model, "nf4", skip=[])
    assert model_nbytes(model) == 256 * 1024 // 2 + 4096 + 16 * 4 + 4  # codes, absmax, scales


def test_merge_into_quantized_default_is_float_linear():
    layer = QuantLinear.from_weight(torch.randn(24, 64), torch.randn(24), method="nf4")
    delta = 0.01 * torch.randn(24, 64)
    merged, message = merge_into_quantized(layer, delta, dtype=torch.bfloat16)
    assert type(merged) is nn.Linear and merged.weight.dtype == torch.bfloat16
    assert "not re-quantized" in message and "bfloat16" in message and "nf4" in message
    x = torch.randn(5, 64)
    expected = layer(x) + x @ delta.T
    # bf16 storage rounds each weight by up to 2^-9 relative: outputs agree to ~0.5%.
    got = merged(x.bfloat16()).float()
    assert torch.isfinite(got).all()
    assert rms(got - expected) / rms(expected) < 1e-2


def test_merge_into_quantized_requantize_reports_extra_error():
    layer = QuantLinear.from_weight(torch.randn(24, 64), method="nf4")
    delta = 0.01 * torch.randn(24, 64)
    merged, message = merge_into_quantized(layer, delta, requantize=True)
    assert isinstance(merged, QuantLinear) and merged.method == "nf4" and merged.double_quant
    assert "re-quantized to nf4" in message and "extra error rms" in message
    extra = rms(merged.dequantize() - (layer.dequantize() + delta))
    assert f"{extra:.3e}" in message
    assert 0 < extra < 0.15  # NF4's own rounding (~9% of unit-variance weights), not more


def test_merge_into_quantized_rejects_wrong_shape():
    layer = QuantLinear.from_weight(torch.randn(24, 64), method="int8")
    with pytest.raises(ValueError, match=r"\(64, 24\) but .* \(24, 64\)"):
        merge_into_quantized(layer, torch.zeros(64, 24))


def test_prepare_model_for_kbit_training(tiny_llama):
    quantize_model(tiny_llama.to(torch.bfloat16), "nf4")
    prepare_model_for_kbit_training(tiny_llama)
    assert tiny_llama.model.layers[0].gradient_checkpointing  # the flag each layer reads
    assert tiny_llama.config.use_cache is False
    assert not any(p.requires_grad for p in tiny_llama.parameters())
    norm = tiny_llama.model.layers[0].input_layernorm
    assert norm.weight.dtype == torch.float32
    assert tiny_llama.model.embed_tokens.weight.dtype == torch.bfloat16


# ------------------------------------------------------------------ LoRA around quantized bases
def _nf4_lora_model(compute_dtype=None, checkpointing_kwargs=None):
    base = quantize_model(make_tiny_llama(), "nf4", compute_dtype=compute_dtype)
    prepare_model_for_kbit_training(base, gradient_checkpointing_kwargs=checkpointing_kwargs)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    return get_peft_model(base, config)


def _train(model, ids, steps: int, lr: float = 2e-2) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointed_nf4_base_sends_gradients_to_every_lora_weight(use_reentrant):
    model = _nf4_lora_model(checkpointing_kwargs={"use_reentrant": use_reentrant})
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would zero A's gradient
            param.data.normal_(std=0.1)
    base_layer = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(base_layer, QuantLinear)
    calls = []
    base_layer.register_forward_hook(lambda *_: calls.append(1))
    model.train()
    ids = torch.randint(0, 128, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == 2  # the forward ran again in backward: checkpointing is on
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 2 * 3 * 2  # 2 layers x 3 targets x (A, B)
    assert all("lora_" in n for n in grads)
    for name, grad in grads.items():
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_nf4_base_trains_under_bf16_autocast():
    # The trainer's mixed precision: the custom backward returns a bf16 gradient for an fp32
    # input, which autograd casts back; every LoRA B (the only nonzero-gradient side at B=0)
    # must still get a finite, nonzero gradient.
    model = _nf4_lora_model()
    model.train()
    ids = torch.randint(0, 128, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert len(grads) == 6
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_lora_on_nf4_trains_saves_no_base_and_loads_on_nf4_and_bf16(tmp_path):
    model = _nf4_lora_model()
    ids = torch.randint(0, 128, (2, 16))
    losses = _train(model, ids, steps=20)
    # A random tiny model starts near ln(128) = 4.85; r=4 on three projections of a width-32
    # model can move it only slowly (measured 4.84 -> 4.42 in 20 steps, every step lower).
    assert losses[-1] < losses[0] - 0.25, losses
    assert all(later < earlier for earlier, later in zip(losses, losses[1:], strict=False))
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert not any("base_layer" in k or "weight_packed" in k or "absmax" in k for k in saved)

    nf4_base = quantize_model(make_tiny_llama(), "nf4")  # same seed: the same quantized base
    reloaded = LoraModel.from_pretrained(nf4_base, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained)

    bf16_base = make_tiny_llama().to(torch.bfloat16)
    with torch.no_grad():
        plain = bf16_base(input_ids=ids).logits.float()
    on_bf16 = LoraModel.from_pretrained(bf16_base, tmp_path).eval()
    with torch.no_grad():
        logits = on_bf16(input_ids=ids).logits.float()
    assert torch.isfinite(logits).all()
    # The adapter moves the bf16 model the way it moved the NF4 model (the bases differ only by
    # NF4 rounding): most of the training loss drop carries over.
    loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    base_loss = nn.functional.cross_entropy(plain[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    assert base_loss - loss > 0.5 * (losses[0] - losses[-1])


@pytest.mark.parametrize(
    ("compute_dtype", "tolerance"),
    [
        # fp32: the merged weight is exactly dequantize() + delta; only summation order differs
        # (measured 3e-7 of the largest logit).
        (torch.float32, 1e-5),
        # bf16: the merged model computes everything in bf16 (2^-9 relative rounding per value)
        # where the unmerged one kept fp32 activations around bf16 matmuls (measured 7e-3).
        (torch.bfloat16, 3e-2),
    ],
)
def test_merged_from_nf4_matches_nf4_plus_adapter(compute_dtype, tolerance, caplog):
    model = _nf4_lora_model(compute_dtype=compute_dtype)
    ids = torch.randint(0, 128, (2, 16))
    _train(model, ids, steps=3)
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits.float()
    with caplog.at_level("INFO"):
        merged_model = model.merge_and_unload()
    assert "dequantized nf4 (double quant) 32x32 weight, added the LoRA delta" in caplog.text
    assert isinstance(merged_model.model.layers[0].self_attn.k_proj, QuantLinear)  # no adapter
    merged_model, message = dequantize_model(merged_model)
    assert (
        message == "dequantized 8 quantized linear layers (nf4) to nn.Linear in their compute dtype"
    )
    assert not any(isinstance(m, QuantLinear) for m in merged_model.modules())
    merged_model.to(compute_dtype)  # one dtype throughout, as exported (norms were made fp32)
    q_proj = merged_model.model.layers[0].self_attn.q_proj
    assert type(q_proj) is nn.Linear and q_proj.weight.dtype == compute_dtype
    with torch.no_grad():
        merged = merged_model(input_ids=ids).logits.float()
    assert torch.isfinite(merged).all()
    error = (merged - unmerged).abs().max().item() / unmerged.abs().max().item()
    assert error < tolerance


# ------------------------------------------------------------------ the built-in 135M model
# Its linear layers: 30 blocks x (q, o: 576x576; k, v: 192x576; gate, up: 1536x576; down:
# 576x1536) = 30 x 3,538,944 = 106,168,320 weights. The tied embedding (49152 x 576 =
# 28,311,552) stays unquantized; the 61 norms hold 61 x 576 = 35,136 weights.
BUILTIN_LINEAR = 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 1536 * 576)
BUILTIN_REST = 49152 * 576 + 61 * 576


@pytest.mark.slow
@pytest.mark.parametrize(
    ("dtype", "quantization", "expected_mb"),
    [
        ("float32", None, 4 * (BUILTIN_LINEAR + BUILTIN_REST) / 1e6),  # 538.1 MB
        ("bfloat16", None, 2 * (BUILTIN_LINEAR + BUILTIN_REST) / 1e6),  # 269.0 MB
        # int8: 1 byte per linear weight + one fp32 absmax per output row, rest in bf16
        ("bfloat16", "int8", (BUILTIN_LINEAR + 2 * BUILTIN_REST) / 1e6),  # 163.3 MB
        # nf4 + double quant: ~4.127 bits per linear weight, rest in bf16
        ("bfloat16", "nf4", (BUILTIN_LINEAR * 4.127 / 8 + 2 * BUILTIN_REST) / 1e6),  # 111.4 MB
    ],
)
def test_builtin_model_bytes_by_precision(dtype, quantization, expected_mb):
    from lorakit.models import load_model

    model = load_model("smollm2-135m-instruct", dtype=dtype, quantization=quantization)
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == (30 * 7 if quantization else 0)
    # The rest of the per-layer scales (int8 rows, the nf4 offsets, padding) is < 0.5%.
    assert model_nbytes(model) / 1e6 == pytest.approx(expected_mb, rel=5e-3)


@pytest.mark.slow
def test_builtin_model_qlora_trains_loads_on_bf16_and_merges(tmp_path):
    from builtin_model import builtin_tokenizer
    from lorakit.models import load_model

    tokenizer = builtin_tokenizer()
    text = "The quick brown fox jumps over the lazy dog. " * 4
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :32]
    model = prepare_model_for_kbit_training(
        load_model("smollm2-135m-instruct", dtype="float32", quantization="nf4")
    )
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    losses = _train(model, ids, steps=4, lr=1e-3)
    # The sentence repeats, so the model predicts much of it already (first loss ~1.4) and the
    # adapter quickly learns the rest.
    assert losses[-1] < 0.8 * losses[0], losses
    model.save_pretrained(tmp_path)
    bf16 = load_model("smollm2-135m-instruct", dtype="bfloat16")
    with torch.no_grad():
        base_loss = bf16(input_ids=ids, labels=ids).loss.item()
        on_bf16 = LoraModel.from_pretrained(bf16, tmp_path).eval()
        adapted_loss = on_bf16(input_ids=ids, labels=ids).loss.item()
    assert base_loss - adapted_loss > 0.5 * (losses[0] - losses[-1]), (base_loss, adapted_loss)
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
    merged_model, _ = dequantize_model(model.merge_and_unload())
    with torch.no_grad():
        merged = merged_model(input_ids=ids).logits
    assert torch.isfinite(merged).all()
    # fp32 compute on both sides: the merged weight is dequantize() + delta exactly, so only
    # summation order differs through 30 layers.
    assert (merged - unmerged).abs().max().item() < 1e-3 * unmerged.abs().max().item()
