"""lorakit.quant.experts: fused MoE expert tensors quantized per expert slice, exactly as
`QuantLinear` quantizes one weight, and the model-level functions that reach them."""

from __future__ import annotations

import pytest
import torch

from lorakit.models import load_model
from lorakit.quant import (
    QuantExperts,
    QuantLinear,
    dequantize_model,
    model_nbytes,
    prepare_model_for_kbit_training,
    quantize_model,
)
from moe_support import expert_parameters, make_tiny_moe

METHODS = [("int8", False), ("nf4", True), ("nf4", False), ("fp4", True)]
# bits a weight takes (codes + scales): 4-bit 4 + 32/64 (+ double quant: 4 + 8/64 + ...)
BITS = {("int8", False): 8, ("nf4", True): 4.127, ("nf4", False): 4.5, ("fp4", True): 4.127}


@pytest.mark.parametrize(("method", "double_quant"), METHODS)
def test_each_expert_slice_is_quantized_as_quantlinear_quantizes_it(method, double_quant):
    weight = torch.randn(3, 48, 40)  # 1920 weights a slice: 30 whole 64-weight blocks
    odd = torch.randn(3, 10, 7)  # 70 a slice: padded to 2 blocks, no block mixes two experts
    for w in (weight, odd):
        q = QuantExperts.quantize(w, method, double_quant)
        assert q.shape == w.shape and q.dtype == w.dtype and not q.requires_grad
        for e in range(w.shape[0]):
            alone = QuantLinear.from_weight(w[e], method=method, double_quant=False)
            # double quantization stores the block absmaxes of all slices together, in 8 bits
            atol = 0.01 * float(w[e].abs().max()) if double_quant else 1e-6
            torch.testing.assert_close(q[e], alone.dequantize(), rtol=0, atol=atol)
        whole = q.dequantize()
        assert torch.equal(whole, torch.stack([q[e] for e in range(w.shape[0])]))
        error = (whole - w).abs().max() / w.abs().max()
        assert 0 < error < (0.01 if method == "int8" else 0.2)


@pytest.mark.parametrize(("method", "double_quant"), METHODS)
def test_expert_memory_shrinks_by_the_format(method, double_quant):
    weight = torch.randn(8, 256, 128)
    q = QuantExperts.quantize(weight, method, double_quant)
    bits = 8 * q.storage_bytes() / weight.numel()
    assert bits == pytest.approx(
        BITS[(method, double_quant)] + (32 / 128 if method == "int8" else 0), rel=0.01
    )


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_quantize_model_reaches_the_experts_and_the_logits_stay_close(family):
    model = make_tiny_moe(family)
    ids = torch.randint(0, 128, (2, 12))
    reference = model(input_ids=ids).logits
    float_bytes = sum(p.numel() * 4 for p in expert_parameters(model).values())
    before = model_nbytes(model)
    quantize_model(model, "nf4")
    experts = expert_parameters(model)
    assert experts and all(isinstance(p, QuantExperts) for p in experts.values())
    quant_bytes = sum(p.storage_bytes() for p in experts.values())
    assert float_bytes / quant_bytes == pytest.approx(32 / 4.127, rel=0.01)
    assert before - model_nbytes(model) > 0.8 * (float_bytes - quant_bytes)
    logits = model(input_ids=ids).logits
    assert 0 < (logits - reference).abs().max() < 0.5 * reference.abs().max()
    # the forward is the float model's with the dequantized weights, to float rounding
    dequantize_model(model, torch.float32)
    torch.testing.assert_close(model(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)


def test_quantized_experts_forward_is_within_nf4_error_of_full_precision():
    model = make_tiny_moe("qwen3_moe")
    ids = torch.randint(0, 128, (2, 12))
    reference = model(input_ids=ids).logits
    float_experts = {n: p.detach().clone() for n, p in expert_parameters(model).items()}
    quantize_model(model, "nf4", skip=["lm_head", "q_proj", "k_proj", "v_proj", "o_proj"])
    for name, q in expert_parameters(model).items():  # NF4: within half a code step per block
        error = (q.dequantize() - float_experts[name]).abs().max()
        assert 0 < error <= 0.17 * float_experts[name].abs().max()
    logits = model(input_ids=ids).logits
    assert 0 < (logits - reference).abs().max() < 0.1 * reference.abs().max()


def test_skip_names_an_expert_tensor():
    model = quantize_model(make_tiny_moe(), "nf4", skip=["lm_head", "experts.down_proj"])
    experts = expert_parameters(model)
    assert {type(p).__name__ for n, p in experts.items() if n.endswith("down_proj")} == {
        "Parameter"
    }
    assert all(isinstance(p, QuantExperts) for n, p in experts.items() if "gate_up" in n)


def test_copy_requantizes_and_dequantize_model_gives_plain_parameters():
    model = quantize_model(make_tiny_moe(), "nf4")
    name, q = next(iter(expert_parameters(model).items()))
    target = q.dequantize() * 0.5
    with torch.no_grad():
        q.copy_(target)  # how a merge writes a weight back
    assert (q.dequantize() - target).abs().max() < 0.1 * target.abs().max()
    assert isinstance(expert_parameters(model)[name], QuantExperts)
    expected = {n: p.dequantize() for n, p in expert_parameters(model).items()}
    _, message = dequantize_model(model, torch.float32)
    assert "and 4 expert tensors (nf4)" in message
    after = expert_parameters(model)
    assert not any(isinstance(p, QuantExperts) for p in after.values())
    assert all(torch.equal(after[n], expected[n]) for n in expected)


def test_a_float_cast_changes_the_compute_dtype_and_keeps_the_codes():
    model = quantize_model(make_tiny_moe(), "nf4")
    q = next(iter(expert_parameters(model).values()))
    codes = q.storage_bytes()
    model.to(torch.bfloat16)
    q16 = next(iter(expert_parameters(model).values()))
    assert isinstance(q16, QuantExperts) and q16.dtype == torch.bfloat16
    assert q16.storage_bytes() == codes and q16[0].dtype == torch.bfloat16


def test_prepare_for_kbit_training_and_gradients_reach_the_inputs():
    model = prepare_model_for_kbit_training(quantize_model(make_tiny_moe(), "nf4"))
    model.train()
    ids = torch.randint(0, 128, (2, 10))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()  # checkpointed layers recompute the dequantized experts
    assert all(not p.requires_grad for p in model.parameters())
    emb = model.get_input_embeddings()
    assert emb.weight.grad is None and torch.isfinite(out.loss)


@pytest.mark.parametrize(("method", "double_quant"), [("nf4", True), ("int8", False)])
def test_loading_quantized_equals_quantizing_the_loaded_model(tmp_path, method, double_quant):
    make_tiny_moe("qwen3_moe").save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), quantization=method, double_quant=double_quant)
    reference = quantize_model(load_model(str(tmp_path)), method, double_quant)
    ours, theirs = expert_parameters(loaded), expert_parameters(reference)
    assert ours.keys() == theirs.keys() and all(isinstance(p, QuantExperts) for p in ours.values())
    assert all(torch.equal(ours[n].dequantize(), theirs[n].dequantize()) for n in ours)
    ids = torch.randint(0, 128, (1, 8))
    assert torch.equal(loaded(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_nf4_experts_with_lora_on_them_learn_and_only_the_adapter_changes():
    from lorakit import LoraConfig, get_peft_model

    model = prepare_model_for_kbit_training(quantize_model(make_tiny_moe(), "nf4"))
    codes = {n: p.dequantize() for n, p in expert_parameters(model).items()}
    config = LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], target_parameters=["gate_up_proj", "down_proj"]
    )
    lora = get_peft_model(model, config).train()
    expert_lora = [n for n, p in lora.named_parameters() if p.requires_grad and "experts" in n]
    assert len(expert_lora) == 2 * 2 * 2  # A and B of 2 tensors in 2 layers
    params = [p for p in lora.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(0, 128, (4, 16))
    losses = []
    for _ in range(5):
        loss = lora(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is not None for n, p in lora.named_parameters() if n in expert_lora)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1
    after = {n.replace(".base_layer", ""): p for n, p in expert_parameters(lora).items()}
    after = {n.removeprefix("base_model.model."): p for n, p in after.items()}
    assert all(torch.equal(after[n].dequantize(), codes[n]) for n in codes)
