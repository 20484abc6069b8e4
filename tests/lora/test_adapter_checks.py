"""What loading checks in an adapter directory beyond keys and shapes: every config field's type
and value, tensor dtypes and values, the size of the update, the chat template; and the
model-level refusals (merged adapters, shared biases, targets saved whole)."""

from __future__ import annotations

import copy
import json
import math
import re
import warnings

import peft
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from conftest import make_tiny_llama
from lorakit import AdapterError, ConfigError, LoraConfig, LoraModel, get_peft_model
from lorakit.errors import LorakitError

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A saved adapter with random A and B on q_proj and v_proj of the tiny Llama."""
    path = tmp_path_factory.mktemp("good") / "adapter"
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(make_tiny_llama(), config)
    with torch.no_grad():
        for _, layer in model.lora_layers():
            layer.lora_weights("default")[1].normal_(0, 0.1)
    model.save_pretrained(path)
    return path


@pytest.fixture
def adapter(good, tmp_path):
    """A fresh copy of the good adapter to damage."""
    target = tmp_path / "adapter"
    target.mkdir()
    for item in good.iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    return target


def edit_config(path, **changes) -> None:
    data = json.loads((path / "adapter_config.json").read_text())
    data.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(data))


def edit_tensors(path, change) -> None:
    tensors = load_file(path / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, path / "adapter_model.safetensors")


B_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.mark.parametrize(
    "field, value, says",
    [
        ("target_modules", [1, 2], r"target_modules=\[1, 2\] is invalid: expected a list"),
        ("rank_pattern", [1], r"rank_pattern=\[1\] is invalid: expected a mapping"),
        ("layers_to_transform", "abc", r"layers_to_transform='abc' is invalid: expected a layer"),
        ("alpha_pattern", {"q_proj": "big"}, r"alpha_pattern\['q_proj'\]='big' is invalid"),
        ("rank_pattern", {"q_proj": 2.5}, r"rank_pattern\['q_proj'\]=2.5 is invalid"),
        ("lora_alpha", float("nan"), r"lora_alpha=nan is invalid: expected a positive number"),
        ("lora_alpha", float("inf"), r"lora_alpha=inf is invalid"),
        ("lora_alpha", True, r"lora_alpha=True is invalid"),
        ("r", True, r"r=True is invalid: expected a positive integer"),
        ("lora_dropout", float("nan"), r"lora_dropout=nan is invalid"),
        ("use_rslora", "yes", r"use_rslora='yes' is invalid: expected true or false"),
        ("modules_to_save", "lm_head", r"modules_to_save='lm_head' is invalid"),
        ("layers_pattern", "(", r"layers_pattern: '\(' is not a valid regular expression"),
        ("exclude_modules", {"a": 1}, r"exclude_modules=\{'a': 1\} is invalid"),
    ],
)
def test_wrong_config_values_name_the_field(adapter, field, value, says):
    edit_config(adapter, **{field: value})  # json writes NaN / Infinity as JavaScript does
    model = make_tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(AdapterError, match=rf"adapter_config\.json: LoraConfig\.{says}"):
        LoraModel.from_pretrained(model, adapter)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_inspect_refuses_wrong_values_without_a_base(adapter, capsys):
    from lorakit.cli.main import main

    edit_config(adapter, alpha_pattern={"q_proj": "big"})
    assert main(["inspect", str(adapter)]) == 1
    assert "alpha_pattern['q_proj']='big'" in capsys.readouterr().err
    edit_config(adapter, alpha_pattern={})
    edit_tensors(adapter, lambda t: t[B_KEY].fill_(3e38))
    assert main(["inspect", str(adapter)]) == 1
    assert "the update of model.layers.0.self_attn.q_proj" in capsys.readouterr().err


@pytest.mark.parametrize(
    "change, says",
    [
        (lambda t: t.update({B_KEY: t[B_KEY].to(torch.int32)}), "has dtype int32; adapter"),
        (lambda t: t.update({B_KEY: t[B_KEY] > 0}), "has dtype bool"),
        (lambda t: t[B_KEY].fill_(float("nan")), "holds non-finite values"),
        # finite, but scaling * B @ A overflows float16 (and float32, beside a large A)
        (lambda t: t[B_KEY].fill_(3e38), r"update of model\.layers\.0\.self_attn\.q_proj"),
    ],
)
def test_tensor_dtypes_and_values_are_checked(adapter, change, says):
    edit_tensors(adapter, change)
    with pytest.raises(AdapterError, match=says):
        LoraModel.from_pretrained(make_tiny_llama(), adapter)


def test_update_size_limit_is_float16s(adapter):
    """scaling 2 * B @ A: an update just under 65504 loads, one just over is refused."""
    a_key = B_KEY.replace("lora_B", "lora_A")
    edit_tensors(adapter, lambda t: (t[a_key].fill_(0), t[a_key][0, 0].fill_(1.0)))
    # the update is then 2 * B[:, 0] in column 0 only: its largest entry is 2 * max |B[:, 0]|
    edit_tensors(adapter, lambda t: t[B_KEY][0, 0].fill_(65504 / 2 * 0.999))
    LoraModel.from_pretrained(make_tiny_llama(), adapter)
    edit_tensors(adapter, lambda t: t[B_KEY][0, 0].fill_(65504 / 2 * 1.001))
    with pytest.raises(AdapterError, match=r"reaches 6.56e\+04; an adapter may add at most 65504"):
        LoraModel.from_pretrained(make_tiny_llama(), adapter)


def test_huge_alpha_is_refused_by_the_update_check(adapter):
    edit_config(adapter, lora_alpha=1e300)
    with pytest.raises(AdapterError, match="lora_alpha / r \\* B @ A"):
        LoraModel.from_pretrained(make_tiny_llama(), adapter)


@pytest.mark.parametrize(
    "content, says",
    [
        (b"{{ messages }}\xff\xfe", r"chat_template\.jinja: not UTF-8 \(byte 14 is b'\\xff'\)"),
        (b"{% for m in messages %}{{ m }}", r"chat_template\.jinja: line 1: not a valid Jinja"),
        (b"{{ x }}" * (1 << 18), r"chat_template\.jinja: 1,835,008 bytes; a chat template may"),
    ],
    ids=["not-utf8", "bad-jinja", "too-large"],
)
def test_bad_chat_templates_name_the_file(adapter, content, says):
    (adapter / "chat_template.jinja").write_bytes(content)
    with pytest.raises(AdapterError, match=says):
        LoraModel.from_pretrained(make_tiny_llama(), adapter)


def test_peft_embedding_adapter_loads_with_peft_s_outputs(tmp_path):
    """peft saves the whole embedding it adapts (`embed_tokens.base_layer.weight`) and loads it
    back into the base; lorakit does the same, and refuses it beside other adapters."""
    base = make_tiny_llama()
    config = peft.LoraConfig(
        r=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), config)
        theirs.save_pretrained(tmp_path / "emb")
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert key in load_file(tmp_path / "emb" / "adapter_model.safetensors")
    ours = LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "emb")
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=0, atol=1e-5)

    edit_tensors(tmp_path / "emb", lambda t: t[key][5].add_(1.0))  # a retrained token row
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "emb")
    ours = LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "emb", adapter_name="e")
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=0, atol=1e-5)
    other = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(AdapterError, match="replaces a base weight the loaded adapters share"):
        other.load_adapter(tmp_path / "emb", "emb")
    assert list(other.peft_config) == ["default"]


def test_a_target_the_base_lacks_is_named_in_a_warning(adapter):
    edit_config(adapter, target_modules=["q_proj", "v_proj", "query_key_value"])
    with pytest.warns(UserWarning, match=r"target_modules \['query_key_value'\] match no module"):
        LoraModel.from_pretrained(make_tiny_llama(), adapter)


def test_targets_inside_modules_to_save_are_skipped_as_in_peft(tmp_path):
    """q_proj both targeted and saved whole: as in peft it is saved whole, not LoRA-wrapped, so
    saving works and peft reads the file with the same outputs."""
    fields = dict(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["q_proj"])
    ours = get_peft_model(make_tiny_llama(), LoraConfig(init_lora_weights=False, **fields))
    with torch.no_grad():
        ours.base_model.model.model.layers[0].self_attn.q_proj.modules_to_save[
            "default"
        ].weight.add_(1)
    ours.save_pretrained(tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "a")
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=0, atol=1e-5)
    assert [n.split(".")[-1] for n, _ in ours.lora_layers()] == ["v_proj", "v_proj"]
    with pytest.raises(ConfigError, match=r"matched no layer .* outside modules_to_save"):
        get_peft_model(
            make_tiny_llama(), LoraConfig(target_modules=["q_proj"], modules_to_save=["q_proj"])
        )


def test_a_merged_adapter_cannot_be_deleted():
    model = get_peft_model(make_tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    model.merge_adapter(["other"])
    with pytest.raises(
        AdapterError,
        match=r"Cannot delete adapter\(s\) \['other'\] while they are merged.*unmerge_adapter",
    ):
        model.delete_adapter("other")
    assert "other" in model.peft_config
    model.unmerge_adapter()
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"]


@pytest.mark.parametrize("first, second", [("all", "none"), ("none", "lora_only"), ("all", "all")])
def test_only_one_adapter_may_train_biases(first, second):
    model = get_peft_model(make_tiny_llama(), LoraConfig(target_modules=["q_proj"], bias=first))
    with pytest.raises(ConfigError, match="only one of a model may train biases"):
        model.add_adapter("other", LoraConfig(target_modules=["q_proj"], bias=second))
    assert list(model.peft_config) == ["default"]


def test_cat_with_rank_pattern_keeps_each_layer_s_rank(tmp_path):
    """The combined adapter's product is sum_i w_i s_i B_i A_i per layer, and it saves and loads."""
    config = LoraConfig(
        r=4,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 2},
        init_lora_weights=False,
    )
    model = get_peft_model(make_tiny_llama(), config)
    model.add_adapter(
        "other", LoraConfig(r=3, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    model.add_weighted_adapter(["default", "other"], [0.7, -0.4], "mix", "cat")
    for name, layer in model.lora_layers():
        want = 0.7 * layer.delta_weight("default") - 0.4 * layer.delta_weight("other")
        torch.testing.assert_close(layer.delta_weight("mix"), want, rtol=1e-5, atol=1e-6)
        assert layer.r["mix"] == (5 if name.endswith("v_proj") else 7)
    model.set_adapter("mix")
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    loaded = LoraModel.from_pretrained(make_tiny_llama(), tmp_path / "mix")
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=1e-5)


# ------------------------------------------------------------------ fuzzing the config values

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
FIELDS = [
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "bias",
    "modules_to_save",
    "fan_in_fan_out",
    "use_rslora",
    "init_lora_weights",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "task_type",
    "inference_mode",
    "use_dora",
    "base_model_name_or_path",
    "peft_type",
]


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(changes=st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, min_size=1, max_size=3))
def test_fuzzed_config_values_load_or_give_lorakit_errors(good, tmp_path_factory, changes):
    """Any JSON value in any field either loads (and then computes finite logits) or raises a
    LorakitError: never a TypeError, AttributeError or re.error."""
    adapter = tmp_path_factory.mktemp("fuzz")
    for item in good.iterdir():
        (adapter / item.name).write_bytes(item.read_bytes())
    edit_config(adapter, **changes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = LoraModel.from_pretrained(make_tiny_llama(), adapter)
        except LorakitError:
            return
    out = logits(model)
    assert torch.isfinite(out).all()
    assert all(math.isfinite(s) for _, layer in model.lora_layers() for s in layer.scaling.values())


def test_every_missing_unexpected_or_mis_shaped_tensor_is_listed_in_one_error(adapter):
    """As mlx-lm's loader does: one error, one line per tensor, not only the first."""
    edit_config(adapter, r=8)  # the file holds rank 4: every A and B has the wrong shape
    gone = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    extra = "base_model.model.model.extra.lora_A.weight"
    edit_tensors(adapter, lambda t: t.update({extra: t.pop(gone)}))
    with pytest.raises(AdapterError) as error:
        LoraModel.from_pretrained(make_tiny_llama(), adapter)
    first, *lines, hint = str(error.value).splitlines()
    layers = len(make_tiny_llama().model.layers)
    assert len(lines) == 2 * 2 * layers + 1  # A and B of q_proj and v_proj, and the extra key
    assert first.endswith(f"does not fit this base ({len(lines)} tensors):")
    assert f"  missing key {gone} (expected shape [32, 8])" in lines
    assert f"  unexpected key {extra}: the base has no such module" in lines
    shapes = [line for line in lines if "has shape [4, 32] but this base needs [8, 32]" in line]
    assert len(shapes) == 2 * layers  # every lora_A, on every layer
    assert "another base model or rank" in hint


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
@pytest.mark.parametrize("kind", ["fifo", "dir"])
def test_an_adapter_file_that_is_not_a_regular_file_is_named_as_such(adapter, name, kind):
    import os

    from lorakit.lora.adapters import read_adapter

    (adapter / name).unlink()
    os.mkfifo(adapter / name) if kind == "fifo" else (adapter / name).mkdir()
    what = "a named pipe (FIFO)" if kind == "fifo" else "a directory"
    with pytest.raises(AdapterError, match=re.escape(f"{name}: is {what}, not a regular file")):
        read_adapter(adapter)  # and never waits on the pipe
