"""Adapter files: peft's format both ways, strict validation, no pickle, clear corruption errors."""

from __future__ import annotations

import copy
import json
import os

import peft
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import lorakit
from conftest import make_tiny_gpt2, make_tiny_llama
from lorakit import AdapterError, LoraConfig, LoraModel, get_peft_model

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "plain": dict(target_modules=LLAMA_TARGETS),
    "rslora": dict(target_modules=["q_proj", "v_proj"], use_rslora=True, lora_alpha=16),
    "rank_pattern": dict(
        target_modules=LLAMA_TARGETS,
        rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.up_proj": 6},
        alpha_pattern={"o_proj": 5},
    ),
    "modules_to_save": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "bias_all": dict(target_modules="all-linear", bias="all"),
    "regex": dict(target_modules=r".*\.(q|v)_proj"),
    "layers_to_transform": dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1]),
}
IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def randomise(model) -> None:
    """Random values in every trainable tensor, so a wrongly loaded key changes outputs."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_lorakit_adapter_loads_in_peft_with_identical_outputs(name, tmp_path):
    base = make_tiny_llama()
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, **CONFIGS[name]))
    randomise(ours)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.allclose(logits(ours), logits(theirs), atol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_peft_adapter_loads_in_lorakit_with_identical_outputs(name, tmp_path):
    base = make_tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, **CONFIGS[name]))
    randomise(theirs)
    theirs.save_pretrained(tmp_path)
    ours = LoraModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.allclose(logits(ours), logits(theirs), atol=1e-5)
    assert not any(p.requires_grad for p in ours.parameters())  # inference mode by default


def test_gpt2_conv1d_round_trip_with_peft(tmp_path):
    base = make_tiny_gpt2()
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["c_attn", "c_fc"]))
    randomise(ours)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.allclose(logits(ours), logits(theirs), atol=1e-5)


def test_saved_keys_and_config_are_peft_s(tmp_path):
    ours = get_peft_model(make_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    ours.save_pretrained(tmp_path)
    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys[0] == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert len(keys) == 4  # 2 layers x (A, B)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["inference_mode"] is True


def test_several_adapters_load_set_and_delete(tmp_path):
    base = make_tiny_llama()
    first = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"]))
    randomise(first)
    first.save_pretrained(tmp_path / "a")
    model = LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", adapter_name="a")
    model.load_adapter(tmp_path / "a", "b")
    model.set_adapter("b")
    assert torch.allclose(logits(model), logits(first), atol=1e-6)
    model.delete_adapter("b")
    assert list(model.peft_config) == ["a"]
    with pytest.raises(AdapterError, match="Adapter b does not exist"):
        model.set_adapter("b")


def test_chat_template_is_saved_and_loaded(tmp_path):
    ours = get_peft_model(make_tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    ours.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    ours.save_pretrained(tmp_path)
    loaded = LoraModel.from_pretrained(make_tiny_llama(), tmp_path)
    assert loaded.chat_template == ours.chat_template


def test_saving_again_replaces_the_adapter_whole_and_keeps_the_user_s_files(tmp_path, monkeypatch):
    ours = get_peft_model(make_tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    ours.chat_template = "{{ messages }}"
    ours.save_pretrained(tmp_path / "a")
    (tmp_path / "a" / "notes.txt").write_text("mine")
    first = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    randomise(ours)
    ours.chat_template = None
    monkeypatch.setattr(lorakit.lora.adapters, "apply_umask", lambda d: 1 / 0)  # fails mid-save
    with pytest.raises(ZeroDivisionError):
        ours.save_pretrained(tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary left
    monkeypatch.undo()
    ours.save_pretrained(tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() != first
    assert (tmp_path / "a" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "a" / "chat_template.jinja").exists()  # not this adapter's template


# ------------------------------------------------------------------ strict validation


@pytest.fixture
def saved(tmp_path):
    model = get_peft_model(make_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomise(model)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def state_of(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before, names) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert list(model.peft_config) == names


@pytest.fixture
def loaded(saved):
    model = LoraModel.from_pretrained(make_tiny_llama(), saved, adapter_name="main")
    return model, state_of(model)


def edit_tensors(path, change) -> None:
    tensors = load_file(path / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, path / "adapter_model.safetensors")


def test_missing_key_is_an_error_and_model_unchanged(saved, loaded):
    model, before = loaded
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    edit_tensors(saved, lambda t: t.pop(key))
    with pytest.raises(AdapterError, match=r"missing key .*layers\.1\.self_attn\.v_proj\.lora_B"):
        model.load_adapter(saved, "second")
    assert_unchanged(model, before, ["main"])


def test_unexpected_key_is_an_error(saved, loaded):
    model, before = loaded
    edit_tensors(
        saved, lambda t: t.update({"base_model.model.model.extra.lora_A.weight": torch.ones(1)})
    )
    with pytest.raises(AdapterError, match=r"unexpected key base_model\.model\.model\.extra"):
        model.load_adapter(saved, "second")
    assert_unchanged(model, before, ["main"])


def test_wrong_rank_names_key_and_both_shapes(saved, loaded):
    model, before = loaded
    config = json.loads((saved / "adapter_config.json").read_text())
    config["r"] = 8
    (saved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(
        AdapterError,
        match=r"q_proj\.lora_A\.weight has shape \[4, 32\] but this base needs \[8, 32\]",
    ):
        model.load_adapter(saved, "second")
    assert_unchanged(model, before, ["main"])


def test_wrong_base_shape_mismatch(saved):
    wider = make_tiny_llama(hidden=64)
    before = state_of(wider)
    with pytest.raises(AdapterError, match=r"has shape \[4, 32\] but this base needs \[4, 64\]"):
        LoraModel.from_pretrained(wider, saved)
    assert all(torch.equal(before[k], v) for k, v in wider.state_dict().items())


def test_target_absent_from_base_is_an_error(saved):
    config = json.loads((saved / "adapter_config.json").read_text())
    config["target_modules"] = ["query_key_value"]
    (saved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="matched no layer"):
        LoraModel.from_pretrained(make_tiny_llama(), saved)


def test_pickle_adapter_is_refused_and_never_run(tmp_path):
    sentinel = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    (tmp_path / "adapter").mkdir()
    torch.save({"x": Payload()}, tmp_path / "adapter" / "adapter_model.bin")
    LoraConfig(r=2, target_modules=["q_proj"]).save(tmp_path / "adapter")
    with pytest.raises(AdapterError, match="pickle adapter files can run code"):
        LoraModel.from_pretrained(make_tiny_llama(), tmp_path / "adapter")
    assert not sentinel.exists()


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],  # truncated
        lambda b: b"garbage" * 10,  # not safetensors at all
        lambda b: (10**12).to_bytes(8, "little") + b[8:],  # header length far beyond the file
        lambda b: b[:8] + b"#" + b[9:],  # corrupt header JSON
    ],
)
def test_corrupt_safetensors_names_the_file(saved, loaded, damage):
    model, before = loaded
    path = saved / "adapter_model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(AdapterError, match="adapter_model.safetensors: not a readable safetensors"):
        model.load_adapter(saved, "second")
    assert_unchanged(model, before, ["main"])


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=512))
def test_fuzzed_weight_files_give_adapter_errors_only(tmp_path_factory, data):
    directory = tmp_path_factory.mktemp("fuzz")
    LoraConfig(r=2, target_modules=["q_proj"]).save(directory)
    (directory / "adapter_model.safetensors").write_bytes(data)
    with pytest.raises(AdapterError):
        lorakit.lora.adapters.read_adapter(directory)


def test_unsupported_peft_feature_is_refused(saved):
    config = json.loads((saved / "adapter_config.json").read_text())
    config["use_qalora"] = True
    (saved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="use_qalora"):
        LoraModel.from_pretrained(make_tiny_llama(), saved)


def test_non_finite_adapter_is_not_saved(tmp_path):
    model = get_peft_model(make_tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))
    with pytest.raises(AdapterError, match="non-finite"):
        model.save_pretrained(tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_loading_for_inference_turns_dropout_off(tmp_path):
    """As in peft: an adapter loaded with is_trainable=False leaves the whole model in eval mode."""
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.5)
    get_peft_model(make_tiny_llama(), config).save_pretrained(tmp_path / "a")
    ids = torch.randint(0, 128, (2, 5))

    model = LoraModel.from_pretrained(make_tiny_llama().train(), tmp_path / "a")
    assert not any(module.training for module in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    model.train()
    model.load_adapter(tmp_path / "a", "again")
    assert not any(module.training for module in model.modules())

    trainable = LoraModel.from_pretrained(
        make_tiny_llama().train(), tmp_path / "a", is_trainable=True
    )
    assert all(module.training for module in trainable.modules())
