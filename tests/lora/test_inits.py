"""PiSSA / OLoRA / LoftQ / gaussian initialisations against peft 0.22.0, and PiSSA's conversion."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from peft.utils.loftq_utils import _low_rank_decomposition
from safetensors.torch import load_file

import lorakit
from conftest import make_tiny_gpt2, make_tiny_llama
from lorakit.errors import ConfigError
from lorakit.quant import QuantLinear, codes, quantize_model

CASES = {
    "llama": (make_tiny_llama, ["q_proj", "v_proj", "down_proj"]),
    "gpt2": (make_tiny_gpt2, ["c_attn", "c_proj"]),
}


def _twins(base: torch.nn.Module, **config):
    """(lorakit, peft) models made from copies of `base` under the same seed."""
    torch.manual_seed(7)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    torch.manual_seed(7)
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**config))
    return ours, theirs


def _assert_same_tensors(ours, theirs, atol: float) -> int:
    """Every base weight and adapter tensor of lorakit's model equals peft's; returns the count."""
    their_params = {k.removeprefix("base_model.model."): v for k, v in theirs.named_parameters()}
    for key, param in ours.get_base_model().named_parameters():
        their_key = key + ".weight" if ".lora_magnitude_vector." in key else key
        torch.testing.assert_close(param, their_params[their_key], rtol=0, atol=atol, msg=key)
    return len(their_params)


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 7))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4"])
def test_pissa_changes_base_and_adapter_as_peft(case, init):
    make, targets = CASES[case]
    base = make()
    ours, theirs = _twins(base, r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init)
    _assert_same_tensors(ours, theirs, atol=1e-4)
    ids = _ids()
    with torch.no_grad():
        # W_res + s * B @ A = W: the model computes the base model's output at the start
        want = base(input_ids=ids).logits
        torch.testing.assert_close(ours(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
    layer = next(layer for _, layer in ours.lora_layers())
    with torch.no_grad():
        weight = layer.dense_weight() + layer.merged_delta(["default"])
        singular = torch.linalg.svdvals(weight)[:4]
        a, b = layer.lora_weights("default")
        # s * B @ A holds the top-4 singular values of W: exactly for the full SVD, within 15%
        # for 4 power iterations of the randomized one (its 4th value is 8% off on tiny GPT-2)
        got = torch.linalg.svdvals(layer.scaling["default"] * b @ a)[:4]
        torch.testing.assert_close(got, singular, rtol=0.15 if "niter" in init else 1e-4, atol=1e-4)


def test_olora_changes_base_and_adapter_as_peft():
    base = make_tiny_llama()
    targets = ["q_proj", "v_proj", "down_proj"]
    ours, theirs = _twins(
        base, r=4, lora_alpha=8, target_modules=targets, init_lora_weights="olora"
    )
    _assert_same_tensors(ours, theirs, atol=1e-4)
    ids = _ids()
    with torch.no_grad():
        want = base(input_ids=ids).logits
        torch.testing.assert_close(ours(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)


def test_olora_on_conv1d_keeps_the_output_and_uses_the_out_in_weight():
    # peft 0.22.0 takes the QR of Conv1D's stored (in, out) weight, which gives A and B the wrong
    # shapes; lorakit factors the (out, in) weight as for nn.Linear (B: orthonormal columns).
    base = make_tiny_gpt2()
    config = lorakit.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights="olora"
    )
    model = lorakit.get_peft_model(copy.deepcopy(base), config)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).logits, base(input_ids=ids).logits, rtol=1e-4, atol=1e-4
        )
    layer = model.get_base_model().transformer.h[0].attn.c_attn
    a, b = layer.lora_weights("default")
    assert a.shape == (4, 32) and b.shape == (96, 4)
    torch.testing.assert_close(b.T @ b, torch.eye(4), rtol=0, atol=1e-5)


def test_olora_on_a_quantized_base_requantizes_the_residual():
    # As peft does for bitsandbytes layers: QR of the dequantized weight, then the residual is
    # quantized again (int8 rows here: rounding error at most half a step, absmax / 127 / 2).
    model = quantize_model(make_tiny_llama(), "int8")
    quantized = model.model.layers[0].self_attn.q_proj.dequantize(torch.float32)
    config = lorakit.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="olora"
    )
    layer = lorakit.get_peft_model(model, config).get_base_model().model.layers[0].self_attn.q_proj
    q, upper = torch.linalg.qr(quantized)
    a, b = layer.lora_weights("default")
    torch.testing.assert_close(b, q[:, :4], rtol=0, atol=1e-6)
    torch.testing.assert_close(a, upper[:4], rtol=0, atol=1e-6)
    residual = quantized - 2.0 * b @ a  # scaling 8 / 4
    half_step = residual.abs().amax(1, keepdim=True) / 127 / 2
    assert ((layer.dense_weight() - residual).abs() <= half_step + 1e-6).all()
    assert not torch.allclose(layer.dense_weight(), quantized, atol=1e-3)


def test_gaussian_equals_peft():
    ours, theirs = _twins(
        make_tiny_llama(), r=4, target_modules=["q_proj"], init_lora_weights="gaussian"
    )
    _assert_same_tensors(ours, theirs, atol=0)
    a, b = ours.get_base_model().model.layers[0].self_attn.q_proj.lora_weights("default")
    assert not b.any() and 0.1 < float(a.std()) < 0.4  # std 1 / r = 0.25


def test_pissa_with_dora_equals_peft():
    make, targets = CASES["llama"]
    ours, theirs = _twins(
        make(), r=4, lora_alpha=8, target_modules=targets, init_lora_weights="pissa", use_dora=True
    )
    assert _assert_same_tensors(ours, theirs, atol=1e-4) > 0


@pytest.mark.parametrize("bits, method", [(4, "nf4"), (8, "int8")])
def test_loftq_base_is_exactly_quantizable_and_reduces_the_error(bits, method):
    base = make_tiny_llama()
    config = lorakit.LoraConfig(
        r=4,
        lora_alpha=4,
        target_modules=["q_proj", "down_proj"],
        init_lora_weights="loftq",
        loftq_config={"loftq_bits": bits, "loftq_iter": 2},
    )
    model = lorakit.get_peft_model(copy.deepcopy(base), config)
    for name, layer in model.lora_layers():
        original = base.get_submodule(name).weight
        residual = layer.dense_weight()
        plain = QuantLinear.from_weight(original, method=method, double_quant=False)
        again = QuantLinear.from_weight(residual, method=method, double_quant=False)
        # the new base is a point of the quantizer's grid: quantizing it again changes nothing
        torch.testing.assert_close(again.dequantize(torch.float32), residual, rtol=0, atol=1e-7)
        with torch.no_grad():
            fitted = residual + layer.merged_delta(["default"])
        assert (original - fitted).norm() < 0.9 * (original - plain.dequantize()).norm()
    quantize_model(model.get_base_model(), method, double_quant=False)
    ids = _ids()
    with torch.no_grad():  # quantizing the LoftQ base afterwards loses nothing more
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_loftq_one_round_equals_peft_low_rank_step():
    # peft's loftq_init needs bitsandbytes on CUDA; its SVD step is checked here: with one round,
    # B @ A is peft's rank-r decomposition (L, R) of W - dequantize(nf4(W)).
    base = make_tiny_llama()
    config = lorakit.LoraConfig(
        r=4,
        target_modules=["q_proj"],
        init_lora_weights="loftq",
        loftq_config={"loftq_bits": 4, "loftq_iter": 1},
    )
    model = lorakit.get_peft_model(copy.deepcopy(base), config)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    weight = base.model.layers[0].self_attn.q_proj.weight.detach()
    packed, absmax = codes.quantize_4bit(weight, "nf4")
    dequantized = codes.dequantize_4bit(packed, absmax, "nf4", weight.numel(), torch.float32)
    dequantized = dequantized.view(weight.shape)
    torch.testing.assert_close(layer.dense_weight(), dequantized, rtol=0, atol=0)
    reference = _low_rank_decomposition(weight - dequantized, reduced_rank=4)
    a, b = layer.lora_weights("default")
    torch.testing.assert_close(b, reference["L"], rtol=0, atol=1e-5)
    torch.testing.assert_close(a, reference["R"], rtol=0, atol=1e-5)


@torch.no_grad()
def _train_a_little(model) -> None:
    """Stand-in for training: move every adapter tensor, the same way in both libraries."""
    generator = torch.Generator().manual_seed(3)
    for name, param in sorted(model.named_parameters()):
        if "lora_" in name:
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_converted_adapter_is_plain_lora_for_the_original_base_as_peft(init, tmp_path):
    base = make_tiny_llama()
    targets = ["q_proj", "v_proj"]
    ours, theirs = _twins(base, r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init)
    ours.save_pretrained(tmp_path / "ours_init")
    theirs.peft_config["default"].init_lora_weights = True  # peft's recipe for the initial copy
    theirs.save_pretrained(tmp_path / "theirs_init")
    theirs.peft_config["default"].init_lora_weights = init
    _train_a_little(ours)
    _train_a_little(theirs)
    ours.save_pretrained(
        tmp_path / "ours", path_initial_model_for_weight_conversion=str(tmp_path / "ours_init")
    )
    theirs.save_pretrained(
        tmp_path / "theirs", path_initial_model_for_weight_conversion=str(tmp_path / "theirs_init")
    )
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs_config = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "init_lora_weights"):
        assert ours_config[key] == theirs_config[key], key
    assert ours_config["r"] == 8
    assert (
        json.loads((tmp_path / "ours_init" / "adapter_config.json").read_text())[
            "init_lora_weights"
        ]
        is True
    )
    ours_tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs_tensors = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert sorted(ours_tensors) == sorted(theirs_tensors)
    for key in ours_tensors:
        torch.testing.assert_close(ours_tensors[key], theirs_tensors[key], rtol=0, atol=1e-4)
    ids = _ids()
    with torch.no_grad():
        trained = ours(input_ids=ids).logits  # the trained adapter on the residual base
        in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
        in_lorakit = lorakit.LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
        torch.testing.assert_close(in_peft(input_ids=ids).logits, trained, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(in_lorakit(input_ids=ids).logits, trained, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_unconverted_adapter_loads_onto_the_original_base_as_in_peft(tmp_path, init):
    """Saved as it is, a PiSSA / OLoRA adapter fits the original base: loading runs the init
    again (the same residual), then the saved tensors fill the adapter, as peft does."""
    base = make_tiny_llama()
    config = {"r": 4, "target_modules": ["q_proj"], "init_lora_weights": init}
    model = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**config))
    with torch.no_grad():
        model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.mul_(2)
    model.save_pretrained(tmp_path / "adapter")
    ids = _ids()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        ours = lorakit.LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
        assert ours.peft_config["default"].init_lora_weights == init
        torch.testing.assert_close(ours(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_bad_initialisations_are_refused_clearly():
    with pytest.raises(ConfigError, match="loftq_config"):
        lorakit.LoraConfig(init_lora_weights="loftq")
    with pytest.raises(ConfigError, match="loftq_bits.*expected 4"):
        lorakit.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 2})
    with pytest.raises(ConfigError, match="not supported by lorakit"):
        lorakit.LoraConfig(init_lora_weights="corda")
    with pytest.raises(ConfigError, match="pissa_niter_N"):
        lorakit.LoraConfig(init_lora_weights="pissa_niter_x")
    quantized = quantize_model(make_tiny_llama(), "nf4")
    with pytest.raises(ConfigError, match="quantized base.*not supported by lorakit"):
        lorakit.get_peft_model(
            quantized, lorakit.LoraConfig(target_modules=["q_proj"], init_lora_weights="pissa")
        )
    with pytest.raises(ConfigError, match="embedding.*not supported by lorakit"):
        lorakit.get_peft_model(
            make_tiny_llama(),
            lorakit.LoraConfig(target_modules=["embed_tokens"], init_lora_weights="olora"),
        )
