"""peft's `peft.tuners.lora` import paths give lorakit's layer classes."""

from __future__ import annotations

import peft.tuners.lora
import peft.tuners.lora.layer
import torch
from torch import nn

import lorakit.tuners.lora
import lorakit.tuners.lora.layer
from lorakit.lora.layers import LoraEmbedding, LoraLayer, LoraLinear


def test_peft_names_exist_where_peft_has_them():
    for name in ("LoraLayer", "Linear", "Embedding", "LoraConfig", "LoraModel"):
        assert hasattr(peft.tuners.lora, name)
        assert hasattr(lorakit.tuners.lora, name)
    for name in ("LoraLayer", "Linear", "Embedding"):
        assert hasattr(peft.tuners.lora.layer, name)
        assert hasattr(lorakit.tuners.lora.layer, name)
    assert lorakit.tuners.lora.layer.Linear is LoraLinear
    assert lorakit.tuners.lora.Embedding is LoraEmbedding
    assert lorakit.tuners.lora.LoraLayer is LoraLayer


def test_linear_takes_peft_constructor_call():
    config = lorakit.tuners.lora.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False)
    layer = lorakit.tuners.lora.Linear(nn.Linear(3, 5), "default", config=config, r=2, lora_alpha=4)
    assert layer.r == {"default": 2} and layer.scaling == {"default": 2.0}
    x = torch.randn(2, 3)
    a, b = layer.lora_weights("default")
    torch.testing.assert_close(layer(x), layer.base_layer(x) + 2.0 * x @ a.T @ b.T)


def test_lora_layer_is_not_a_module_so_peft_style_subclasses_resolve():
    assert not issubclass(LoraLayer, nn.Module)

    class Mine(nn.Module, lorakit.tuners.lora.LoraLayer):
        def __init__(self, base_layer, adapter_name, **kwargs):
            super().__init__()
            lorakit.tuners.lora.LoraLayer.__init__(self, base_layer)
            self.update_layer(adapter_name, 2, lora_alpha=2)

    layer = Mine(nn.Linear(3, 4), "a")
    assert [n for n, _ in layer.named_parameters()] == [
        "base_layer.weight",
        "base_layer.bias",
        "lora_A.a.weight",
        "lora_B.a.weight",
    ]
