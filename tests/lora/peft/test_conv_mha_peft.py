"""LoRA on convolutions and MultiheadAttention against peft (the oracle): an adapter made by
peft (init_lora_weights=False, every factor non-zero) loads in lorakit, and one saved by
lorakit loads in peft; outputs, gradients, merged weights and saved tensors are peft's."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lorakit import LoraModel

TOL = dict(atol=1e-5, rtol=1e-5)
FILE = "adapter_model.safetensors"


class ConvNet(nn.Module):
    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.lin = nn.Linear(conv.out_channels, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.lin(h.flatten(2).mean(-1))


CONVS = {  # name: (layer, input shape)
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (3, 4, 11)),
    "conv2d": (lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=1, dilation=2), (3, 4, 9, 9)),
    "conv2d_reflect": (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), (3, 4, 6, 6)),
    "conv2d_1x1": (lambda: nn.Conv2d(4, 6, 1, bias=False), (3, 4, 5, 5)),
    "conv3d": (lambda: nn.Conv3d(4, 6, 3, padding="same"), (3, 4, 5, 5, 5)),
    "conv2d_groups": (lambda: nn.Conv2d(4, 8, 3, groups=2), (3, 4, 6, 6)),
}


def _twins(case: str, tmp_path, **config):
    """(base, peft model, lorakit model loaded from peft's file, input)."""
    make, shape = CONVS[case]
    torch.manual_seed(0)
    base = ConvNet(make())
    settings = dict(r=4, lora_alpha=8, target_modules=["conv", "lin"], init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**{**settings, **config}))
    theirs.save_pretrained(tmp_path / "peft")
    ours = LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft", is_trainable=True)
    return base, theirs, ours, torch.randn(*shape)


def _grads(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            key = name.removeprefix(prefix).removesuffix(".weight").removesuffix(".default")
            out[key.replace(".default.", ".")] = param.grad
    return out


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("case", list(CONVS))
def test_conv_adapter_equals_peft_both_ways(case, dora, tmp_path):
    base, theirs, ours, x = _twins(case, tmp_path, use_dora=dora)
    expected, got = theirs(x), ours(x)
    torch.testing.assert_close(got, expected, **TOL)
    assert not torch.allclose(got, base(x), **TOL)
    expected.square().sum().backward()
    got.square().sum().backward()
    their_grads = _grads(theirs, "base_model.model.")
    our_grads = _grads(ours.get_base_model())
    assert their_grads.keys() == our_grads.keys()
    for key, grad in their_grads.items():
        torch.testing.assert_close(our_grads[key].reshape(grad.shape), grad, **TOL)
    ours.save_pretrained(tmp_path / "ours")
    their_file = load_file(tmp_path / "peft" / FILE)
    our_file = load_file(tmp_path / "ours" / FILE)
    assert their_file.keys() == our_file.keys()
    for key, tensor in their_file.items():
        torch.testing.assert_close(our_file[key], tensor, **TOL)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(back(x), got, **TOL)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("case", [c for c in CONVS if "groups" not in c])
def test_merged_conv_weights_equal_peft(case, dora, tmp_path):
    _, theirs, ours, x = _twins(case, tmp_path, use_dora=dora)
    with torch.no_grad():
        theirs.merge_adapter()
        ours.merge_adapter()
        their_conv, our_conv = theirs.base_model.model.conv, ours.get_base_model().conv
        torch.testing.assert_close(our_conv.base_layer.weight, their_conv.base_layer.weight, **TOL)
        torch.testing.assert_close(ours(x), theirs(x), **TOL)
        theirs.unmerge_adapter()
        ours.unmerge_adapter()
        torch.testing.assert_close(our_conv.base_layer.weight, their_conv.base_layer.weight, **TOL)
        merged = ours.merge_and_unload()
        reference = theirs.merge_and_unload()
        torch.testing.assert_close(merged(x), reference(x), **TOL)


def test_several_conv_adapters_and_mixed_rows_equal_peft(tmp_path):
    _, theirs, ours, x = _twins("conv2d", tmp_path)
    second = peft.LoraConfig(r=2, target_modules=["conv"], init_lora_weights=False)
    theirs.add_adapter("second", second)
    theirs.save_pretrained(tmp_path / "peft")
    ours.load_adapter(tmp_path / "peft" / "second", adapter_name="second")
    theirs.eval()
    ours.eval()
    names = ["default", "__base__", "second"]
    torch.testing.assert_close(ours(x, adapter_names=names), theirs(x, adapter_names=names), **TOL)
    theirs.set_adapter("second")
    ours.set_adapter("second")
    torch.testing.assert_close(ours(x), theirs(x), **TOL)


@pytest.mark.parametrize("combination", ["linear", "cat", "ties"])
def test_weighted_conv_adapters_equal_peft(combination, tmp_path):
    _, theirs, ours, x = _twins("conv2d", tmp_path)
    second = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["conv"], init_lora_weights=False)
    theirs.add_adapter("second", second)
    theirs.save_pretrained(tmp_path / "peft")
    ours.load_adapter(tmp_path / "peft" / "second", adapter_name="second")
    extra = {"density": 0.5} if combination == "ties" else {}
    for model in (theirs, ours):
        model.add_weighted_adapter(["default", "second"], [0.7, 0.4], "both", combination, **extra)
        model.set_adapter("both")
    torch.testing.assert_close(ours(x), theirs(x), **TOL)
    with pytest.raises(ValueError, match="not supported by lorakit"):
        ours.add_weighted_adapter(["default", "second"], [0.7, 0.4], "svd", "svd")
    assert "svd" not in ours.peft_config


class MhaNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2)
        self.lin = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.mha(x, x, x)
        return self.lin(out)


def _mha_twins(tmp_path, zero_out_proj: bool = False):
    torch.manual_seed(0)
    base = MhaNet()
    config = peft.LoraConfig(target_modules=["mha", "lin"], init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    if zero_out_proj:
        with torch.no_grad():
            theirs.base_model.model.mha.base_layer.out_proj.lora_B["default"].weight.zero_()
    theirs.save_pretrained(tmp_path / "peft")
    ours = LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft", is_trainable=True)
    return base, theirs, ours, torch.randn(5, 3, 8)


def test_mha_adapter_equals_peft_both_ways(tmp_path):
    base, theirs, ours, x = _mha_twins(tmp_path)
    expected, got = theirs(x), ours(x)
    torch.testing.assert_close(got, expected, **TOL)
    assert not torch.allclose(got, base(x), **TOL)
    ours.save_pretrained(tmp_path / "ours")
    their_file = load_file(tmp_path / "peft" / FILE)
    our_file = load_file(tmp_path / "ours" / FILE)
    assert their_file.keys() == our_file.keys()
    for key, tensor in their_file.items():
        torch.testing.assert_close(our_file[key], tensor, **TOL)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(back(x), got, **TOL)
    with torch.no_grad():
        theirs.merge_adapter()
        ours.merge_adapter()
        their_mha, our_mha = theirs.base_model.model.mha, ours.get_base_model().mha
        torch.testing.assert_close(our_mha.in_proj_weight, their_mha.in_proj_weight, **TOL)
        torch.testing.assert_close(our_mha.out_proj.weight, their_mha.out_proj.weight, **TOL)
        merged, reference = ours.merge_and_unload(), theirs.merge_and_unload()
        torch.testing.assert_close(merged(x), reference(x), **TOL)
    assert merged.state_dict().keys() == reference.state_dict().keys()


def test_mha_gradients_equal_peft(tmp_path):
    # With a non-zero out_proj update peft's in_proj gradients are taken with out_proj's unmerged
    # weight (its unmerge after the forward writes into the tensor autograd saved), so the
    # comparison uses a zero out_proj B; tests/lora/test_mha.py checks lorakit's gradients
    # against autograd's with every factor non-zero.
    _, theirs, ours, x = _mha_twins(tmp_path, zero_out_proj=True)
    theirs(x).square().sum().backward()
    ours(x).square().sum().backward()
    their_grads = _grads(theirs, "base_model.model.")
    our_grads = _grads(ours.get_base_model())
    assert their_grads.keys() == our_grads.keys()
    for key, grad in their_grads.items():
        torch.testing.assert_close(our_grads[key], grad, **TOL)
