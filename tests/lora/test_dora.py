"""DoRA (`use_dora=True`) against peft 0.22.0: forward, gradients, merging, files,
quantized bases."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import lorakit
from conftest import make_tiny_gpt2, make_tiny_llama
from lorakit.errors import ConfigError
from lorakit.lora.dora import cached_weight_norms
from lorakit.quant import QuantLinear, quantize_model

CASES = {
    "llama": (make_tiny_llama, ["q_proj", "v_proj", "down_proj"]),
    "gpt2": (make_tiny_gpt2, ["c_attn", "c_proj"]),
    "embedding": (make_tiny_llama, ["embed_tokens", "v_proj"]),  # m per embedding dimension
}


def _peft_name(key: str) -> str:
    """lorakit keeps m as `lora_magnitude_vector.<adapter>`, peft as `...<adapter>.weight`."""
    if ".lora_magnitude_vector." in key:
        return key + ".weight"
    return key


@torch.no_grad()
def _randomise(model: torch.nn.Module) -> None:
    """Non-trivial adapter weights: B != 0 and m != ||W + dW||, so every term of DoRA counts."""
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.add_(torch.randn_like(param) * 0.2)


def _twins(base: torch.nn.Module, **config):
    """(lorakit, peft) DoRA models on copies of `base`, lorakit holding peft's weights."""
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(use_dora=True, **config))
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(use_dora=True, **config))
    _randomise(theirs)
    their_params = {k.removeprefix("base_model.model."): v for k, v in theirs.named_parameters()}
    copied = 0
    with torch.no_grad():
        for key, param in ours.get_base_model().named_parameters():
            if "lora_" in key:
                param.copy_(their_params[_peft_name(key)])
                copied += 1
    assert copied == sum("lora_" in k for k in their_params)
    return ours, theirs


def _ids(rows: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(0, 128, (rows, length))


@pytest.mark.parametrize("case", sorted(CASES))
def test_initial_magnitude_is_the_row_norm_and_equals_peft(case):
    make, targets = CASES[case]
    base = make()
    config = dict(r=4, lora_alpha=8, target_modules=targets, use_dora=True)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**config))
    their_params = dict(theirs.base_model.model.named_parameters())
    for name, layer in ours.lora_layers():
        m = layer.lora_magnitude_vector["default"]
        # B = 0 at the start, so m = ||W|| per output row: the (out, in) weight's rows
        torch.testing.assert_close(m, layer.dense_weight().norm(dim=1), rtol=0, atol=1e-6)
        peft_m = their_params[f"{name}.lora_magnitude_vector.default.weight"]
        torch.testing.assert_close(m, peft_m, rtol=0, atol=1e-6)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, base(input_ids=ids).logits)


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_gradients_equal_peft(case):
    make, targets = CASES[case]
    ours, theirs = _twins(make(), r=4, lora_alpha=8, target_modules=targets)
    ids = _ids()
    out_ours, out_theirs = ours(input_ids=ids, labels=ids), theirs(input_ids=ids, labels=ids)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out_ours.logits, make()(input_ids=ids).logits, atol=1e-3)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    their_params = {k.removeprefix("base_model.model."): v for k, v in theirs.named_parameters()}
    trainable = [(k, p) for k, p in ours.get_base_model().named_parameters() if p.requires_grad]
    assert len(trainable) == sum(p.requires_grad for p in theirs.parameters())
    assert any("lora_magnitude_vector" in k for k, _ in trainable)
    for key, param in trainable:
        want = their_params[_peft_name(key)].grad
        torch.testing.assert_close(param.grad, want, rtol=1e-5, atol=1e-5, msg=key)


def test_lora_dropout_in_training_equals_peft():
    # With dropout active the base term uses dropout(x) W^T; the same seed gives the same masks.
    ours, theirs = _twins(
        make_tiny_llama(), r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj", "v_proj"]
    )
    ours.train()
    theirs.train()
    ids = _ids()
    torch.manual_seed(1)
    got = ours(input_ids=ids).logits
    torch.manual_seed(1)
    want = theirs(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    ours.eval()
    assert not torch.allclose(ours(input_ids=ids).logits, got, atol=1e-4)


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_unmerge_and_merge_and_unload_equal_peft(case):
    make, targets = CASES[case]
    ours, theirs = _twins(make(), r=4, lora_alpha=8, target_modules=targets)
    ids = _ids()
    with torch.no_grad():
        unmerged = ours(input_ids=ids).logits
        weights = {k: v.clone() for k, v in ours.get_base_model().state_dict().items()}
        ours.merge_adapter()
        theirs.merge_adapter()
        merged = ours(input_ids=ids).logits
        torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        ours.unmerge_adapter()
        for key, value in ours.get_base_model().state_dict().items():
            torch.testing.assert_close(value, weights[key], rtol=1e-5, atol=1e-6, msg=key)
        plain_ours = ours.merge_and_unload()
        plain_theirs = theirs.merge_and_unload()
        assert not any("lora_" in k for k in plain_ours.state_dict())
        torch.testing.assert_close(
            plain_ours(input_ids=ids).logits,
            plain_theirs(input_ids=ids).logits,
            rtol=1e-5,
            atol=1e-5,
        )


def test_dora_after_a_merged_plain_adapter_uses_the_unmerged_norm_as_peft():
    base = make_tiny_llama()
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    theirs.add_adapter("dora", peft.LoraConfig(use_dora=True, **config))
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**config))
    ours.add_adapter("dora", lorakit.LoraConfig(use_dora=True, **config))
    _randomise(theirs)
    their_params = {k.removeprefix("base_model.model."): v for k, v in theirs.named_parameters()}
    with torch.no_grad():
        for key, param in ours.get_base_model().named_parameters():
            if "lora_" in key:
                param.copy_(their_params[_peft_name(key)])
        ours.merge_adapter(["default"])
        theirs.merge_adapter(["default"])
        ours.merge_adapter(["dora"])
        theirs.merge_adapter(["dora"])
        for name, layer in ours.lora_layers():
            want = theirs.base_model.model.get_submodule(name).base_layer.weight
            torch.testing.assert_close(layer.base_layer.weight, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_files_move_both_ways_between_lorakit_and_peft(case, tmp_path):
    make, targets = CASES[case]
    base = make()
    ours, theirs = _twins(base, r=4, lora_alpha=8, target_modules=targets)
    ids = _ids()
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
        ours.save_pretrained(tmp_path / "ours")
        theirs.save_pretrained(tmp_path / "theirs")
        loaded_by_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
        loaded_by_us = lorakit.LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "theirs")
        assert loaded_by_us.peft_config["default"].use_dora
        torch.testing.assert_close(loaded_by_peft(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded_by_us(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_quantized_base_equals_peft_on_the_dequantized_weights():
    # The oracle: peft's DoRA on a float model holding exactly the dequantized NF4 weights.
    targets = ["q_proj", "v_proj", "down_proj"]
    quantized = quantize_model(make_tiny_llama(), "nf4", skip=["lm_head"])
    dense = make_tiny_llama()
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, QuantLinear):
                dense.get_submodule(name).weight.copy_(module.dequantize(torch.float32))
    ours = lorakit.get_peft_model(
        quantized, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True)
    )
    _, theirs = _twins(dense, r=4, lora_alpha=8, target_modules=targets)
    their_params = {k.removeprefix("base_model.model."): v for k, v in theirs.named_parameters()}
    with torch.no_grad():
        for key, param in ours.get_base_model().named_parameters():
            if "lora_" in key:
                param.copy_(their_params[_peft_name(key)])
    ids = _ids()
    out = ours(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    assert (
        ours.get_base_model()
        .model.layers[0]
        .self_attn.q_proj.lora_magnitude_vector["default"]
        .grad.any()
    )
    with torch.no_grad():
        merged = ours.merge_and_unload()(input_ids=ids).logits
    torch.testing.assert_close(merged, out.logits.detach(), rtol=1e-5, atol=1e-5)


def test_mixed_adapter_rows_equal_single_adapter_runs():
    model = lorakit.get_peft_model(
        make_tiny_llama(),
        lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True),
    )
    model.add_adapter("plain", lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    _randomise(model)
    model.eval()
    ids = _ids(rows=3)
    names = ["default", "plain", None]
    with torch.no_grad():
        singles = []
        for row, name in enumerate(names):
            if name is None:
                with model.disable_adapter():
                    singles.append(model(input_ids=ids[row : row + 1]).logits)
            else:
                model.set_adapter(name)
                singles.append(model(input_ids=ids[row : row + 1]).logits)
        packed = model.pack_adapters()
        with model.mixed_adapters(names, packed):
            mixed = model(input_ids=ids).logits
    torch.testing.assert_close(mixed, torch.cat(singles), rtol=1e-5, atol=1e-5)
    grouped = model(input_ids=ids, adapter_names=names).logits  # with autograd: gathered rows
    torch.testing.assert_close(grouped, torch.cat(singles), rtol=1e-5, atol=1e-5)


def test_cached_weight_norms_give_the_same_output_and_are_dropped_on_exit():
    model = lorakit.get_peft_model(
        make_tiny_llama(),
        lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True),
    )
    _randomise(model)
    model.eval()
    ids = _ids()
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with cached_weight_norms(model):
            first = model(input_ids=ids).logits
            assert set(layer.dora_norm_cache) == {"default"}
            cached = layer.dora_norm_cache["default"]
            assert model(input_ids=ids).logits.equal(first)
            assert layer.dora_norm_cache["default"] is cached
        assert layer.dora_norm_cache is None
    torch.testing.assert_close(first, want, rtol=0, atol=0)


def test_unsupported_uses_are_refused_clearly():
    model = lorakit.get_peft_model(
        make_tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"], use_dora=True)
    )
    model.add_adapter("other", lorakit.LoraConfig(target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ConfigError, match="DoRA.*not supported by lorakit"):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix", "linear")
    with pytest.raises(ConfigError, match="use_dora"):
        lorakit.LoraConfig(target_modules=["q_proj"], use_dora="yes")


def test_state_dict_helpers_carry_the_magnitude():
    model = lorakit.get_peft_model(
        make_tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)
    )
    saved = lorakit.get_peft_model_state_dict(model)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    assert saved[key].shape == (32,)
    result = lorakit.set_peft_model_state_dict(model, {key: torch.full((32,), 0.5)})
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert torch.equal(layer.lora_magnitude_vector["default"], torch.full((32,), 0.5))
    in_memory = "base_model.model.model.layers.{}.self_attn.q_proj.lora_magnitude_vector.default"
    assert result.unexpected_keys == [] and in_memory.format(0) not in result.missing_keys
    missing = lorakit.set_peft_model_state_dict(model, {}).missing_keys
    assert in_memory.format(1) in missing
