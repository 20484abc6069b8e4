"""peft's public LoRA surface beyond the basics, each against peft itself on the same model.
Its compat modules' own tests: test_tuner.py, test_reading.py, test_peft_names.py, test_auto.py,
test_hf_face.py, test_surface.py."""

from __future__ import annotations

import copy
import re

import peft
import pytest
import torch
import yaml
from peft.optimizers import create_loraplus_optimizer as peft_loraplus
from peft_oracle import twin_models
from torch import nn

import lorakit
from conftest import make_tiny_llama
from lorakit.errors import ConfigError


def test_disable_and_enable_adapter_layers():
    ours, theirs = twin_models(
        make_tiny_llama(), target_modules=["q_proj"], init_lora_weights=False
    )
    ids = torch.tensor([[5, 6, 7]])
    with_adapter = ours(input_ids=ids).logits
    ours.disable_adapter_layers()
    theirs.base_model.disable_adapter_layers()
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
    assert not torch.allclose(ours(input_ids=ids).logits, with_adapter)
    with ours.disable_adapter():  # leaving the context keeps the layers disabled
        pass
    assert not torch.allclose(ours(input_ids=ids).logits, with_adapter)
    ours.enable_adapter_layers()
    torch.testing.assert_close(ours(input_ids=ids).logits, with_adapter)


def test_targeted_module_names_match_peft():
    ours, theirs = twin_models(make_tiny_llama(), target_modules=["q_proj", "down_proj"])
    assert sorted(ours.targeted_module_names) == sorted(theirs.targeted_module_names)
    assert len(ours.targeted_module_names) == 4  # 2 layers x 2 targets


def test_layer_set_adapter_and_get_delta_weight_match_peft():
    ours, theirs = twin_models(
        make_tiny_llama(), target_modules=["q_proj"], init_lora_weights=False, lora_alpha=16
    )
    mine = ours.base_model.model.model.layers[0].self_attn.q_proj
    peft_layer = theirs.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(
        mine.get_delta_weight("default"), peft_layer.get_delta_weight("default")
    )
    ours.add_adapter("other", lorakit.LoraConfig(target_modules=["q_proj"]))
    mine.set_adapter("other")
    assert mine.active_adapters == ["other"]


def test_saved_adapter_has_peft_model_card(tmp_path):
    ours = lorakit.get_peft_model(make_tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"]))
    ours.get_base_model().config._name_or_path = "org/tiny-llama"
    ours.save_pretrained(tmp_path / "a")
    card = (tmp_path / "a" / "README.md").read_text()
    meta = yaml.safe_load(re.search(r"---\n(.*?)\n---", card, re.DOTALL).group(1))
    assert meta["library_name"] == "peft" and "lora" in meta["tags"]
    assert meta["base_model"] == "org/tiny-llama"
    (tmp_path / "a" / "README.md").write_text("my own notes")
    ours.save_pretrained(tmp_path / "a")  # a card the user edited is kept
    assert (tmp_path / "a" / "README.md").read_text() == "my own notes"


@pytest.mark.parametrize("autocast", [True, False])
def test_autocast_adapter_dtype_as_peft(autocast):
    base = make_tiny_llama().to(torch.bfloat16)
    config = {"target_modules": ["q_proj"]}
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(**config), autocast_adapter_dtype=autocast
    )
    ours = lorakit.get_peft_model(
        base, lorakit.LoraConfig(**config), autocast_adapter_dtype=autocast
    )
    dtypes = {n: p.dtype for n, p in theirs.named_parameters() if "lora_" in n}
    assert {n: p.dtype for n, p in ours.named_parameters() if "lora_" in n} == dtypes
    assert set(dtypes.values()) == {torch.float32 if autocast else torch.bfloat16}


def test_loraplus_optimizer_groups_match_peft():
    base = make_tiny_llama()
    config = {"target_modules": ["q_proj", "v_proj"], "bias": "lora_only"}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    ours = lorakit.get_peft_model(base, lorakit.LoraConfig(**config))
    kwargs = {"lr": 1e-3, "loraplus_lr_ratio": 16.0, "loraplus_weight_decay": 0.01}
    peft_opt = peft_loraplus(theirs, torch.optim.AdamW, **kwargs, betas=(0.8, 0.9))
    our_opt = lorakit.create_loraplus_optimizer(ours, torch.optim.AdamW, **kwargs, betas=(0.8, 0.9))
    names_theirs = {id(p): n for n, p in theirs.named_parameters()}
    names_ours = {id(p): n for n, p in ours.named_parameters()}

    def shape(opt, names):
        return [
            (g["lr"], g["weight_decay"], g["betas"], sorted(names[id(p)] for p in g["params"]))
            for g in opt.param_groups
        ]

    assert shape(our_opt, names_ours) == shape(peft_opt, names_theirs)
    assert our_opt.param_groups[2]["lr"] == pytest.approx(1.6e-2)  # B matrices: lr x ratio


def test_config_round_trip_and_peft_type(tmp_path):
    config = lorakit.LoraConfig(r=4, target_modules=["q_proj"], peft_type="LORA")
    assert config.peft_type == peft.PeftType.LORA and config.peft_type.value == "LORA"
    config.save_pretrained(tmp_path)
    assert lorakit.LoraConfig.from_pretrained(tmp_path) == config
    assert lorakit.LoraConfig.from_json_file(tmp_path / "adapter_config.json")["r"] == 4
    # peft reads what lorakit wrote
    assert peft.LoraConfig.from_pretrained(tmp_path).r == 4


@pytest.mark.parametrize(
    "kwargs",
    [
        {"use_qalora": True},
        {"alora_invocation_tokens": [1, 2]},
        {"init_lora_weights": "eva"},
        {"velora_config": {"rank": 2}},
    ],
)
def test_unimplemented_peft_features_are_refused_by_name(kwargs):
    with pytest.raises(ConfigError, match="not supported by lorakit"):
        lorakit.LoraConfig(**kwargs)


def test_unsupported_layer_kind_is_refused_by_name():
    model = nn.Sequential(nn.LayerNorm(3))
    with pytest.raises(ConfigError, match="`0` is a LayerNorm, which LoRA cannot wrap"):
        lorakit.get_peft_model(model, lorakit.LoraConfig(target_modules=["0"]))


@pytest.mark.parametrize("container", [nn.ModuleList, nn.ModuleDict, nn.ParameterList])
def test_modules_to_save_refuses_containers_as_peft(container):
    model = nn.Sequential()
    model.add_module("other_layer", nn.Linear(4, 4))
    items = [nn.Parameter(torch.rand(2))] if container is nn.ParameterList else [nn.Linear(2, 2)]
    model.add_module("module", container({"0": items[0]} if container is nn.ModuleDict else items))
    config = {"target_modules": ["other_layer"], "modules_to_save": ["module"]}
    for wrap, make in (
        (peft.get_peft_model, peft.LoraConfig),
        (lorakit.get_peft_model, lorakit.LoraConfig),
    ):
        with pytest.raises(TypeError, match="modules_to_save cannot be applied to modules of type"):
            wrap(copy.deepcopy(model), make(**config))


def test_get_peft_model_takes_peft_keyword_names():
    model = nn.Sequential(nn.Linear(4, 4))
    wrapped = lorakit.get_peft_model(
        model=model, peft_config=lorakit.LoraConfig(target_modules=["0"])
    )
    assert wrapped.targeted_module_names == ["0"]


def test_modules_to_save_reads_as_the_running_module():
    base = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model = lorakit.get_peft_model(
        base, lorakit.LoraConfig(target_modules=["0"], modules_to_save=["2"])
    )
    head = model.get_base_model()[2]
    assert head.weight is head.modules_to_save["default"].weight
    assert head.out_features == 2
    torch.testing.assert_close(head(input=torch.ones(1, 4)), head(torch.ones(1, 4)))  # keywords
    with model.disable_adapter():
        assert head.weight is head.original_module.weight


def test_no_recursion_when_attributes_are_read_before_init():
    """DeepSpeed's init wrapper calls hasattr on the half-made object."""
    for cls in (lorakit.LoraModel, lorakit.lora.layers.ModulesToSave):
        obj = cls.__new__(cls)
        assert not hasattr(obj, "abc")
