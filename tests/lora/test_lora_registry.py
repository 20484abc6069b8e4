"""The layer registry: built-in kinds and layer classes of one's own (peft's
`_register_custom_module`), against peft on the same model and weights."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from peft.tuners import lora as peft_lora
from tests.conftest import make_tiny_llama
from tests.lora.peft.peft_oracle import copy_adapter
from torch import nn

import lorakit
from lorakit.lora import registry
from lorakit.lora.conv import LoraConv
from lorakit.lora.layers import LoraEmbedding, LoraLinear
from lorakit.lora.mha import LoraMHA, LoraOutProj
from lorakit.tuners import lora as kit_lora


class Scaled(nn.Module):
    """A layer neither lorakit nor peft knows: y = (x @ W^T) * s."""

    def __init__(self, n_in: int = 6, n_out: int = 5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in))
        self.scale = nn.Parameter(torch.rand(n_out) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.weight.T) * self.scale


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(4, 6)
        self.custom = Scaled()
        self.lin1 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.custom(torch.relu(self.lin0(x)))))


def lora_layer_class(base):
    """A LoRA layer for `Scaled` written against peft's LoraLayer (`base`): the same text runs
    with peft's and lorakit's, only the import differs."""

    class ScaledLora(nn.Module, base):
        def __init__(self, base_layer, adapter_name, config=None, r=8, lora_alpha=8, **kwargs):
            super().__init__()
            base.__init__(self, base_layer, **kwargs)
            self.in_features, self.out_features = base_layer.weight.shape[::-1]
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

        def forward(self, x, *args, **kwargs):
            result = self.base_layer(x, *args, **kwargs)
            if self.disable_adapters or self.merged:
                return result
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                h = self.lora_A[name](self.lora_dropout[name](x))
                result = result + self.lora_B[name](h) * self.scaling[name] * self.base_layer.scale
            return result

    return ScaledLora


def twins(mapping_ours, mapping_theirs, **fields):
    torch.manual_seed(0)
    base = Net()
    fields = {"target_modules": ["lin0", "custom", "lin1"], "init_lora_weights": False, **fields}
    config_theirs = peft.LoraConfig(**fields)
    config_theirs._register_custom_module(mapping_theirs)
    config_ours = lorakit.LoraConfig(**fields)
    config_ours._register_custom_module(mapping_ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), config_theirs)
    ours = lorakit.get_peft_model(copy.deepcopy(base), config_ours)
    copy_adapter(theirs, ours, "default")
    return base, ours, theirs


def test_builtin_kinds_go_through_the_registry():
    assert registry.layer_class(nn.Linear(2, 3)) is LoraLinear
    assert registry.layer_class(nn.Embedding(4, 3)) is LoraEmbedding
    assert registry.layer_class(nn.Conv3d(1, 1, 1)) is LoraConv
    assert registry.layer_class(nn.MultiheadAttention(4, 2)) is LoraMHA
    assert registry.layer_class(Scaled()) is None
    attention = nn.MultiheadAttention(4, 2)
    assert registry.layer_class(attention.out_proj, parent=attention) is LoraOutProj
    assert registry.layer_class(attention.out_proj) is LoraLinear  # not inside an attention


def test_a_registered_class_wins_over_the_builtin_one():
    class Mine(kit_lora.Linear):
        pass

    config = lorakit.LoraConfig(target_modules=["lin0", "lin1"])
    config._register_custom_module({nn.Linear: Mine})
    model = lorakit.get_peft_model(Net(), config)
    assert type(model.base_model.model.lin0) is Mine
    assert isinstance(model.base_model.model.lin0.base_layer, nn.Linear)


@pytest.mark.parametrize("style", ["subclass Linear", "nn.Module + LoraLayer"])
def test_custom_layer_equals_peft_forward_gradient_and_files(style, tmp_path):
    if style == "subclass Linear":  # peft's own test of the feature subclasses lora.Linear
        ours_cls, theirs_cls = type("L", (kit_lora.Linear,), {}), type("L", (peft_lora.Linear,), {})
        Scaled.in_features, Scaled.out_features = 6, 5  # what lora.Linear reads
    else:
        ours_cls, theirs_cls = (
            lora_layer_class(kit_lora.LoraLayer),
            lora_layer_class(peft_lora.LoraLayer),
        )
    try:
        base, ours, theirs = twins({Scaled: ours_cls}, {Scaled: theirs_cls})
        assert isinstance(ours.base_model.model.custom, ours_cls)
        x = torch.randn(7, 4)
        out_ours, out_theirs = ours(x), theirs(x)
        torch.testing.assert_close(out_ours, out_theirs, atol=1e-5, rtol=1e-5)
        out_ours.square().sum().backward()
        out_theirs.square().sum().backward()
        grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
        mine = {"base_model.model." + n: p for n, p in ours.get_base_model().named_parameters()}
        assert sorted(n for n, p in mine.items() if p.requires_grad) == sorted(grads)
        for name, grad in grads.items():
            torch.testing.assert_close(mine[name].grad, grad, atol=1e-5, rtol=1e-5)

        ours.save_pretrained(tmp_path / "ours")
        theirs.save_pretrained(tmp_path / "theirs")
        from safetensors.torch import load_file

        a = load_file(tmp_path / "ours" / "adapter_model.safetensors")
        b = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
        assert sorted(a) == sorted(b)
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
        # each reads the other's folder, the mapping registered again (not saved, as in peft)
        config = lorakit.LoraConfig.from_pretrained(tmp_path / "theirs")
        config._register_custom_module({Scaled: ours_cls})
        loaded = lorakit.LoraModel.from_pretrained(
            copy.deepcopy(base), tmp_path / "theirs", config=config
        )
        torch.testing.assert_close(loaded(x), out_theirs, atol=1e-5, rtol=1e-5)
        config = peft.LoraConfig.from_pretrained(tmp_path / "ours")
        config._register_custom_module({Scaled: theirs_cls})
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours", config=config)
        torch.testing.assert_close(back(x), out_ours, atol=1e-5, rtol=1e-5)
    finally:
        for name in ("in_features", "out_features"):
            if name in Scaled.__dict__:
                delattr(Scaled, name)


def test_a_second_adapter_uses_update_layer_and_disabling_works():
    cls = lora_layer_class(kit_lora.LoraLayer)
    config = lorakit.LoraConfig(target_modules=["custom"], init_lora_weights=False)
    config._register_custom_module({Scaled: cls})
    model = lorakit.get_peft_model(Net(), config)
    model.add_adapter("other", config)
    layer = model.base_model.model.custom
    assert sorted(layer.r) == ["default", "other"]
    x = torch.randn(3, 4)
    with model.disable_adapter():
        plain = model(x)
    torch.testing.assert_close(plain, model.unload()(x))


def test_without_registration_the_layer_is_refused_with_the_hook_named():
    with pytest.raises(lorakit.ConfigError, match="_register_custom_module"):
        lorakit.get_peft_model(Net(), lorakit.LoraConfig(target_modules=["custom"]))


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ([Scaled], "takes a dict"),
        ({"Scaled": LoraLinear}, "not an nn.Module subclass"),
        ({Scaled: nn.Linear}, "does not subclass lorakit's LoraLayer"),
        ({Scaled: kit_lora.LoraLayer}, "is not an nn.Module"),
    ],
)
def test_bad_mappings_are_refused(mapping, message):
    with pytest.raises(TypeError, match=message):
        lorakit.LoraConfig()._register_custom_module(mapping)


def test_the_builtin_kinds_still_wrap_a_transformers_model():
    model = lorakit.get_peft_model(
        make_tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj", "embed_tokens"])
    )
    kinds = {type(m).__name__ for _, m in model.get_base_model().named_modules()}
    assert {"LoraLinear", "LoraEmbedding"} <= kinds


def test_inject_adapter_in_model_keeps_the_registered_mapping():
    cls = lora_layer_class(kit_lora.LoraLayer)
    config = lorakit.LoraConfig(target_modules=["custom", "lin0"])
    config._register_custom_module({Scaled: cls})
    model = lorakit.inject_adapter_in_model(config, Net())
    assert isinstance(model.custom, cls) and isinstance(model.lin0, LoraLinear)
    assert model.custom.lora_A["default"].weight.requires_grad
    assert not model.custom.base_layer.weight.requires_grad
