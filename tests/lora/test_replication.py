"""`layer_replication`: repeated decoder layers sharing weights, each copy with its own LoRA;
against peft on the same tiny Llama and weights."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import make_tiny_llama
from tests.lora.peft.peft_oracle import twin_models

import lorakit
from lorakit.lora import replication

TOL = {"atol": 1e-5, "rtol": 1e-5}
CONFIG = {
    "r": 2,
    "lora_alpha": 4,
    "init_lora_weights": False,
    "target_modules": ["q_proj", "v_proj", "down_proj"],
    "layer_replication": [[0, 2], [1, 3]],
}
IDS = torch.tensor([[3, 7, 1, 9, 4], [2, 2, 8, 5, 6]])


def three_layers():
    return make_tiny_llama(layers=3)


def test_layers_are_stacked_and_share_weights():
    model = three_layers()
    originals = list(model.model.layers)
    replication.replicate(model, [[0, 2], [1, 3]])
    layers = model.model.layers
    assert len(layers) == 4 and model.config.num_hidden_layers == 4
    sources = [0, 1, 1, 2]
    for copy_, source in zip(layers, sources, strict=True):
        assert copy_ is not originals[source]
        assert copy_.self_attn.q_proj.weight is originals[source].self_attn.q_proj.weight
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2, 3]
    assert replication.replicated_map(model) == [[0, 2], [1, 3]]


def test_outputs_gradients_and_saved_tensors_equal_peft(tmp_path):
    ours, theirs = twin_models(three_layers(), **CONFIG)
    assert len(ours.get_base_model().model.layers) == 4
    out_ours, out_theirs = ours(IDS).logits, theirs(IDS).logits
    torch.testing.assert_close(out_ours, out_theirs, **TOL)
    plain = three_layers()(IDS).logits
    assert not torch.allclose(out_ours, plain, atol=1e-3)  # four layers, adapted
    out_ours.square().mean().backward()
    out_theirs.square().mean().backward()
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    mine = {"base_model.model." + n: p for n, p in ours.get_base_model().named_parameters()}
    assert sorted(n for n, p in mine.items() if p.requires_grad) == sorted(grads)
    for name, grad in grads.items():
        torch.testing.assert_close(mine[name].grad, grad, **TOL)
    # the copies of layer 1 train their own adapters
    layers = ours.get_base_model().model.layers
    assert not torch.equal(
        layers[1].self_attn.q_proj.lora_A["default"].weight.grad,
        layers[2].self_attn.q_proj.lora_A["default"].weight.grad,
    )

    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    a = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    b = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and any(".layers.3." in k for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    with torch.no_grad():
        expected = theirs(IDS).logits
        loaded = lorakit.LoraModel.from_pretrained(three_layers(), tmp_path / "theirs")
        torch.testing.assert_close(loaded(IDS).logits, expected, **TOL)
        back = peft.PeftModel.from_pretrained(three_layers(), tmp_path / "ours")
        torch.testing.assert_close(back(IDS).logits, expected, **TOL)
    assert loaded.peft_config["default"].layer_replication == [[0, 2], [1, 3]]


def test_merging_gives_each_copy_its_own_weights():
    ours, _ = twin_models(three_layers(), **CONFIG)
    with torch.no_grad():
        unmerged = ours(IDS).logits
        merged = ours.merge_and_unload()
        torch.testing.assert_close(merged(IDS).logits, unmerged, **TOL)
    layers = merged.model.layers
    assert layers[1].self_attn.q_proj.weight is not layers[2].self_attn.q_proj.weight
    assert len(layers) == merged.config.num_hidden_layers == 4


def test_check_adapter_reads_a_replicated_adapter_against_the_plain_base(tmp_path):
    ours, _ = twin_models(three_layers(), **CONFIG)
    ours.save_pretrained(tmp_path)
    base = three_layers()
    check = lorakit.lora.check_adapter(base, tmp_path)
    assert any(".layers.3." in key for key in check.expected)
    assert len(base.model.layers) == 3  # untouched


def test_other_ranges_on_a_replicated_model_are_refused():
    ours, _ = twin_models(three_layers(), **CONFIG)
    ours.add_adapter("same", lorakit.LoraConfig(**CONFIG))
    with pytest.raises(lorakit.ConfigError, match="replicated with"):
        ours.add_adapter("other", lorakit.LoraConfig(**{**CONFIG, "layer_replication": [[0, 3]]}))
    plain = lorakit.get_peft_model(three_layers(), lorakit.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(lorakit.ConfigError, match="has adapters"):
        plain.add_adapter("late", lorakit.LoraConfig(**CONFIG))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([[2, 1]], "0 <= start < end"),
        ([[0, 1.5]], "0 <= start < end"),
        ("0:2", "0 <= start < end"),
    ],
)
def test_bad_ranges_are_refused(value, message):
    with pytest.raises(lorakit.ConfigError, match=message):
        lorakit.LoraConfig(layer_replication=value)


def test_a_range_past_the_last_layer_is_refused():
    with pytest.raises(lorakit.ConfigError, match="reaches past the model's 3 layers"):
        lorakit.get_peft_model(
            three_layers(), lorakit.LoraConfig(**{**CONFIG, "layer_replication": [[0, 4]]})
        )


def test_a_model_without_decoder_layers_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(lorakit.ConfigError, match="no list of decoder layers"):
        replication.replicate(copy.deepcopy(model), [[0, 1]])
