"""`lora_bias=True`: a trainable bias on lora_B, against peft on the same model and weights:
outputs, gradients, merged weights, saved tensors, and files read both ways."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import make_tiny_gpt2
from tests.lora.peft.peft_oracle import add_twin_adapter, twin_models

import lorakit
from lorakit.lora.consumers import Facts, findings

TOL = {"atol": 1e-5, "rtol": 1e-5}


def biased_llama():
    """A tiny Llama whose attention and MLP projections have biases."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=True,
        mlp_bias=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


CONFIG = {
    "r": 4,
    "lora_alpha": 8,
    "lora_bias": True,
    "init_lora_weights": False,
    "target_modules": ["q_proj", "v_proj", "down_proj"],
}
IDS = torch.tensor([[1, 5, 9, 2, 7, 3], [4, 4, 8, 1, 0, 6]])


def trainable_grads(model, prefix=""):
    return {
        prefix + n: p.grad for n, p in model.named_parameters() if p.requires_grad and "lora" in n
    }


@pytest.mark.parametrize("make", [biased_llama, make_tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_forward_gradients_and_merge_equal_peft(make):
    targets = ["c_attn", "c_proj"] if make is make_tiny_gpt2 else CONFIG["target_modules"]
    ours, theirs = twin_models(make(), **{**CONFIG, "target_modules": targets})
    out_ours, out_theirs = ours(IDS).logits, theirs(IDS).logits
    torch.testing.assert_close(out_ours, out_theirs, **TOL)
    out_ours.square().mean().backward()
    out_theirs.square().mean().backward()
    theirs_grads = trainable_grads(theirs)
    ours_grads = trainable_grads(ours.get_base_model(), "base_model.model.")
    assert sorted(ours_grads) == sorted(theirs_grads)
    assert any(name.endswith("lora_B.default.bias") for name in ours_grads)
    for name, grad in theirs_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, **TOL)

    merged_ours = ours.merge_and_unload()
    merged_theirs = theirs.merge_and_unload()
    theirs_state = merged_theirs.state_dict()
    for key, value in merged_ours.state_dict().items():
        torch.testing.assert_close(value, theirs_state[key], **TOL)
    torch.testing.assert_close(merged_ours(IDS).logits, out_theirs, **TOL)


def test_saved_tensors_equal_peft_and_files_load_both_ways(tmp_path):
    ours, theirs = twin_models(biased_llama(), **CONFIG)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    peft_file = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert sorted(mine) == sorted(peft_file)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias" in mine
    for key, value in mine.items():
        torch.testing.assert_close(value, peft_file[key], atol=0, rtol=0)
    expected = theirs(IDS).logits
    read_ours = lorakit.LoraModel.from_pretrained(biased_llama(), tmp_path / "theirs")
    torch.testing.assert_close(read_ours(IDS).logits, expected, **TOL)
    read_theirs = peft.PeftModel.from_pretrained(biased_llama(), tmp_path / "ours")
    torch.testing.assert_close(read_theirs(IDS).logits, expected, **TOL)
    assert read_ours.peft_config["default"].lora_bias is True


def test_unmerge_restores_the_base_bias_and_two_adapters_match_peft():
    ours, theirs = twin_models(biased_llama(), **CONFIG)
    add_twin_adapter(ours, theirs, "other", **CONFIG)
    ours.set_adapter(["default", "other"])
    theirs.base_model.set_adapter(["default", "other"])
    torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, **TOL)
    layer = ours.get_base_model().model.layers[0].self_attn.q_proj
    before = layer.base_layer.bias.clone()
    ours.merge_adapter()
    assert not torch.equal(layer.base_layer.bias, before)
    torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, **TOL)
    ours.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.bias, before, atol=1e-6, rtol=0)


def test_per_row_adapters_add_the_bias():
    ours, _ = twin_models(biased_llama(), **CONFIG)
    ours.add_adapter("other", lorakit.LoraConfig(**CONFIG))
    mixed = ours(IDS, adapter_names=["default", "other"]).logits
    ours.set_adapter("default")
    torch.testing.assert_close(mixed[0], ours(IDS[:1]).logits[0], **TOL)
    ours.set_adapter("other")
    torch.testing.assert_close(mixed[1], ours(IDS[1:]).logits[0], **TOL)


def test_a_base_without_bias_warns_then_refuses_to_merge_as_peft():
    from tests.conftest import make_tiny_llama

    config = {**CONFIG, "target_modules": ["q_proj"]}
    with pytest.warns(UserWarning, match="has no bias"):
        ours = lorakit.get_peft_model(make_tiny_llama(), lorakit.LoraConfig(**config))
    with pytest.warns(UserWarning, match="has no bias"):
        theirs = peft.get_peft_model(make_tiny_llama(), peft.LoraConfig(**config))
    with pytest.raises(RuntimeError, match="no bias"):
        theirs.merge_adapter()
    weight = ours.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    with pytest.raises(RuntimeError, match="base layer has no bias"):
        ours.merge_adapter()
    layer = ours.get_base_model().model.layers[0].self_attn.q_proj
    assert torch.equal(layer.base_layer.weight, weight) and not layer.merged_adapters


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"target_modules": ["embed_tokens"]}, "embedding"),
        ({"use_dora": True}, "DoRA"),
        ({"init_lora_weights": "gaussian"}, "init_lora_weights"),
    ],
)
def test_what_peft_refuses_is_refused(fields, message):
    with pytest.raises(lorakit.ConfigError, match=message):
        lorakit.get_peft_model(biased_llama(), lorakit.LoraConfig(**{**CONFIG, **fields}))
    with pytest.raises(ValueError):
        peft.get_peft_model(biased_llama(), peft.LoraConfig(**{**CONFIG, **fields}))


def test_consumers_name_the_adapter_bias(tmp_path):
    ours, _ = twin_models(biased_llama(), **CONFIG)
    ours.save_pretrained(tmp_path)
    adapter = lorakit.lora.read_adapter(tmp_path)
    raw = adapter.config.to_dict()
    found = findings(Facts(adapter.config, list(adapter.tensors), raw))
    by = {(f.consumer, f.what) for f in found}
    assert any(c == "vllm" and "lora_bias" in w for c, w in by)
    assert any(c == "llama.cpp" and "lora_bias" in w for c, w in by)
    plain = copy.deepcopy(adapter.config)
    plain.lora_bias = False
    keys = [k for k in adapter.tensors if not k.endswith("lora_B.bias")]
    assert not any("lora_bias" in f.what for f in findings(Facts(plain, keys, {})))


@pytest.mark.parametrize("combination_type", ["linear", "cat", "svd"])
def test_weighted_adapters_combine_biases_as_peft(combination_type):
    ours, theirs = twin_models(biased_llama(), **CONFIG)
    add_twin_adapter(ours, theirs, "other", **CONFIG)
    for model in (ours, theirs):
        model.add_weighted_adapter(["default", "other"], [0.7, 0.4], "mix", combination_type)
        model.set_adapter("mix")
    torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, atol=1e-4, rtol=1e-4)
    layer = ours.get_base_model().model.layers[1].mlp.down_proj
    their_layer = theirs.base_model.model.model.layers[1].mlp.down_proj
    torch.testing.assert_close(layer.lora_B["mix"].bias, their_layer.lora_B["mix"].bias, **TOL)


def test_peft_state_dict_helpers_carry_the_bias():
    from peft import get_peft_model_state_dict as peft_get

    ours, theirs = twin_models(biased_llama(), **CONFIG)
    mine = lorakit.get_peft_model_state_dict(ours)
    peft_dict = peft_get(theirs)
    assert sorted(mine) == sorted(peft_dict)
    fresh = lorakit.get_peft_model(biased_llama(), lorakit.LoraConfig(**CONFIG))
    partial = {k: v for k, v in peft_dict.items() if not k.endswith("q_proj.lora_B.bias")}
    result = lorakit.set_peft_model_state_dict(fresh, partial)
    assert result.missing_keys == [
        f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.default.bias" for i in (0, 1)
    ]
    assert result.unexpected_keys == []


def test_merging_into_a_quantized_base_folds_the_bias():
    from lorakit.quant import quantize_model

    model = biased_llama()
    quantize_model(model, "nf4")
    lora = lorakit.get_peft_model(model, lorakit.LoraConfig(**CONFIG))
    layer = lora.get_base_model().model.layers[0].self_attn.q_proj
    want = layer.base_layer.bias + layer.scaling["default"] * layer.lora_B["default"].bias
    with torch.no_grad():
        unmerged = lora(IDS).logits
        merged = lora.merge_and_unload()
        torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.bias, want)
        torch.testing.assert_close(merged(IDS).logits, unmerged, atol=1e-3, rtol=1e-3)
