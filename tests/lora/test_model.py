"""`LoraModel`'s own behaviour, without peft: adapters by name, the base output when disabled,
merging, saving and loading, the parameter counts."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import make_tiny_llama
from torch import nn

import lorakit
from lorakit.errors import AdapterError, ConfigError


def _base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def _config(**fields) -> lorakit.LoraConfig:
    fields = {"r": 2, "lora_alpha": 4, **fields}
    return lorakit.LoraConfig(target_modules=["0", "2"], init_lora_weights=False, **fields)


def _randomise(model: lorakit.LoraModel, name: str) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".{name}." in n or n.endswith(f".{name}"):
                p.copy_(torch.randn_like(p))


X = torch.arange(8, dtype=torch.float32).reshape(2, 4) / 8


def test_add_set_and_delete_adapters():
    model = lorakit.get_peft_model(_base(), _config())
    model.add_adapter("other", _config(r=4))
    assert list(model.peft_config) == ["default", "other"] and model.active_adapters == ["default"]
    model.set_adapter("other")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 4 and all(".other." in n for n in trainable)
    assert model.get_base_model()[0].lora_A["other"].weight.shape == (4, 4)
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]
    with pytest.raises(AdapterError, match="Adapter other does not exist"):
        model.set_adapter("other")
    with pytest.raises(ConfigError, match="an adapter named `default` exists"):
        model.add_adapter("default", _config())


def test_disable_adapter_gives_the_base_output():
    base = _base()
    expected = base(X)
    model = lorakit.get_peft_model(base, _config())
    _randomise(model, "default")
    assert not torch.allclose(model(X), expected)
    with model.disable_adapter():
        torch.testing.assert_close(model(X), expected, rtol=0, atol=0)
    assert not torch.allclose(model(X), expected)


def test_forward_is_base_plus_scaled_update():
    base = _base()
    model = lorakit.get_peft_model(base, _config())
    _randomise(model, "default")
    first = model.get_base_model()[0]
    a, b = first.lora_A["default"].weight, first.lora_B["default"].weight
    expected = first.base_layer(X) + (4 / 2) * X @ a.T @ b.T
    torch.testing.assert_close(first(X), expected)


def test_merge_and_unload_equals_the_unmerged_model():
    model = lorakit.get_peft_model(_base(), _config())
    _randomise(model, "default")
    unmerged = model(X).detach()
    plain = model.merge_and_unload()
    assert all(type(m) in (nn.Sequential, nn.Linear, nn.ReLU) for m in plain.modules())
    torch.testing.assert_close(plain(X), unmerged, rtol=1e-6, atol=1e-6)


def test_save_and_load_round_trip(tmp_path):
    model = lorakit.get_peft_model(_base(), _config())
    _randomise(model, "default")
    expected = model(X).detach()
    model.save_pretrained(tmp_path / "adapter")
    names = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert names == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    loaded = lorakit.LoraModel.from_pretrained(_base(), tmp_path / "adapter")
    torch.testing.assert_close(loaded(X), expected, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference
    loaded.load_adapter(tmp_path / "adapter", "again")
    assert list(loaded.peft_config) == ["default", "again"]


def test_print_trainable_parameters(capsys):
    model = lorakit.get_peft_model(_base(), _config())
    # base: 4*6+6 + 6*3+3 = 51; adapters: (2*4 + 6*2) + (2*6 + 3*2) = 38
    assert model.get_nb_trainable_parameters() == (38, 89)
    model.print_trainable_parameters()
    assert capsys.readouterr().out == (
        "trainable params: 38 || all params: 89 || trainable%: 42.6966\n"
    )


def test_peft_keywords_are_checked_in_one_place():
    with pytest.raises(TypeError, match="get_peft_model\\(\\) got an unexpected keyword argument"):
        lorakit.get_peft_model(_base(), _config(), colour="red")
    model = lorakit.get_peft_model(_base(), _config(), low_cpu_mem_usage=True, revision="v1")
    assert model.peft_config["default"].extra["revision"] == "v1"
    with pytest.raises(TypeError, match="add_adapter\\(\\) got an unexpected keyword argument"):
        model.add_adapter("x", _config(), mixed=True)


def test_add_adapter_takes_peft_and_transformers_call_shapes():
    model = lorakit.get_peft_model(
        make_tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"])
    )
    model.add_adapter("positional", lorakit.LoraConfig(r=3, target_modules=["v_proj"]))
    model.add_adapter(
        adapter_name="keywords", peft_config=lorakit.LoraConfig(r=4, target_modules=["q_proj"])
    )
    model.add_adapter(
        lorakit.LoraConfig(r=5, target_modules=["k_proj"]), adapter_name="config first"
    )
    model.add_adapter(adapter_name="like active")  # peft's quicktour: the active adapter's settings
    ranks = {name: config.r for name, config in model.peft_config.items()}
    assert ranks == {
        "default": 2,
        "positional": 3,
        "keywords": 4,
        "config first": 5,
        "like active": 2,
    }
    layer = model.get_base_model().model.layers[0].self_attn
    assert layer.k_proj.r == {"config first": 5} and "like active" in layer.q_proj.r
    with pytest.raises(ConfigError, match="exists"):
        model.add_adapter(
            lorakit.LoraConfig(target_modules=["q_proj"])
        )  # transformers' name: 'default'
    with pytest.raises(TypeError, match="unexpected keyword argument 'rank'"):
        model.add_adapter("x", lorakit.LoraConfig(target_modules=["q_proj"]), rank=3)
