"""Mixture-of-experts families against peft 0.22 (the oracle): `all-linear` reaches the experts,
files go both ways with equal logits, the pre-0.19.1 expert layout loads, merging is exact; and
the dense families keep 100 % coverage and peft-equal files."""

from __future__ import annotations

import copy
import functools
import json
import warnings

import peft
import pytest
import torch
from peft.tuners.lora.layer import ParamWrapper
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.lora.adapters import check_adapter, read_adapter
from lorakit.lora.layers import LoraLinear
from lorakit.lora.layouts import CURRENT, SWAPPED
from lorakit.lora.moe import all_linear_parameters, coverage
from lorakit.lora.params import LoraParams
from moe_models import DENSE_CONFIGS, MOE_CONFIGS, tiny_model

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
ATOL = 1e-5


@functools.cache
def base(family: str) -> torch.nn.Module:
    configs = MOE_CONFIGS if family in MOE_CONFIGS else DENSE_CONFIGS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiny_model(family, configs)


def fresh(family: str) -> torch.nn.Module:
    return copy.deepcopy(base(family))


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(IDS).logits


def ours_all_linear(family: str) -> lorakit.LoraModel:
    config = lorakit.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear")
    config.init_lora_weights = False  # random A and B: a test that cannot pass on zeros
    return lorakit.get_peft_model(fresh(family), config)


def our_adapted(model) -> set[str]:
    names = set()
    for path, module in model.get_base_model().named_modules():
        if isinstance(module, LoraLinear):
            names.add(f"{path}.weight")
        elif isinstance(module, LoraParams):
            names.update(f"{path}.{p}" for p in module.param_names())
    return names


def peft_adapted(model) -> set[str]:
    names = set()
    for path, module in model.get_base_model().named_modules():
        path = path.replace(".base_layer", "")
        if isinstance(module, ParamWrapper):
            names.add(f"{path}.{module.parameter_name}")
        elif isinstance(module, peft.tuners.lora.LoraLayer):
            names.add(f"{path}.weight")
    return names


@pytest.mark.parametrize("family", sorted(MOE_CONFIGS))
def test_all_linear_reaches_experts_and_covers_what_peft_does(family):
    ours = ours_all_linear(family)
    theirs = peft.get_peft_model(fresh(family), peft.LoraConfig(r=2, target_modules="all-linear"))
    adapted = our_adapted(ours)
    assert peft_adapted(theirs) <= adapted
    assert any(n.endswith("experts.gate_up_proj") for n in adapted)
    assert any(n.endswith("experts.down_proj") for n in adapted)
    done, total = coverage(ours.get_base_model())
    assert done == total  # every decoder weight matrix, experts and routers included
    saved = ours.peft_config["default"]
    assert saved.target_modules != "all-linear" and saved.target_parameters


@pytest.mark.parametrize("family", sorted(MOE_CONFIGS))
def test_one_train_step_changes_only_adapter_tensors(family):
    ours = ours_all_linear(family)
    ours.train()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    ours(IDS, labels=IDS).loss.backward()
    optimizer.step()
    changed = {k for k, v in ours.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any("gate_up_proj" in k for k in changed) and any("down_proj" in k for k in changed)


@pytest.mark.parametrize("family", sorted(MOE_CONFIGS))
def test_saved_folder_loads_in_peft_with_equal_logits_and_merges(family, tmp_path):
    ours = ours_all_linear(family)
    ours.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["target_modules"] != "all-linear" and written["target_parameters"]
    theirs = peft.PeftModel.from_pretrained(fresh(family), tmp_path)
    expected = logits(ours)
    assert (expected - logits(base(family))).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(logits(theirs), expected, atol=ATOL, rtol=0)
    merged = ours.merge_and_unload()
    assert not any(isinstance(m, (LoraLinear, LoraParams)) for m in merged.modules())
    torch.testing.assert_close(logits(merged), expected, atol=ATOL, rtol=0)


def _peft_expert_adapter(family: str, path) -> torch.nn.Module:
    config = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["o_proj"],
        target_parameters=all_linear_parameters(base(family)),
        init_lora_weights=False,
    )
    theirs = peft.get_peft_model(fresh(family), config)
    theirs.save_pretrained(path)
    return theirs


@pytest.mark.parametrize("family", sorted(MOE_CONFIGS))
def test_peft_saved_expert_adapter_loads_with_equal_logits(family, tmp_path):
    theirs = _peft_expert_adapter(family, tmp_path)
    ours = lorakit.LoraModel.from_pretrained(fresh(family), tmp_path)
    assert any(isinstance(m, LoraParams) for m in ours.modules())
    torch.testing.assert_close(logits(ours), logits(theirs), atol=ATOL, rtol=0)
    files = read_adapter(tmp_path)
    check_adapter(fresh(family), files)
    assert files.layout == CURRENT


def _old_layout(a: torch.Tensor, b: torch.Tensor, experts: int):
    """peft 0.17 - 0.19.0 tensors of one expert stack (E, out, in), from the current ones.

    peft 0.18 read a stack (E, d1, d2) as in = d1, out = d2, with A (E·r, d1), B (d2, r·E) and
    dW[e] = einsum('o r e, e r i -> e i o')[e] = (B_e @ A_e)^T, where A_e = A[e·r : e·r + r] and
    B_e = B[:, e::E]. The current layout (peft >= 0.19.1) reads in = d2, out = d1 with
    dW[e] = B'_e @ A'_e. Equal updates: A_e^T... so A_old_e = B'_e^T and B_old_e = A'_e^T, i.e.
    A_old[e·r + k] = B'[:, k·E + e] and B_old[:, k·E + e] = A'[e·r + k]. Written out per entry,
    independently of lorakit's own conversion."""
    r = a.shape[0] // experts
    old_a = torch.empty(experts * r, b.shape[0])
    old_b = torch.empty(a.shape[1], r * experts)
    for e in range(experts):
        for k in range(r):
            old_a[e * r + k] = b[:, k * experts + e]
            old_b[:, k * experts + e] = a[e * r + k]
    return old_a, old_b


@pytest.mark.parametrize("family", sorted(MOE_CONFIGS))
def test_pre_0_19_1_layout_loads_with_equal_logits(family, tmp_path):
    theirs = _peft_expert_adapter(family, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    swapped = 0
    for path, module in theirs.named_modules():
        if not isinstance(module, ParamWrapper) or module.num_experts == 1:
            continue
        if getattr(module.get_base_layer(), "is_transposed", False):
            continue  # peft 0.17 / 0.18 wrote transposed stacks (gpt-oss) as today
        a_key, b_key = f"{path}.lora_A.weight", f"{path}.lora_B.weight"
        old_a, old_b = _old_layout(tensors[a_key], tensors[b_key], module.num_experts)
        # peft 0.18's formula on the old tensors gives peft 0.22's update
        d1, d2 = module.get_param().shape[1:]
        old_delta = (
            torch.einsum(
                "o r e, e r i -> e i o",
                old_b.reshape(d2, -1, module.num_experts),
                old_a.reshape(module.num_experts, -1, d1),
            )
            * module.scaling["default"]
        )
        torch.testing.assert_close(old_delta, module.get_delta_weight("default"))
        tensors[a_key], tensors[b_key] = old_a, old_b
        swapped += 1
    if family != "gpt_oss":
        assert swapped > 0
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["peft_version"] = "0.18.1"
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    ours = lorakit.LoraModel.from_pretrained(fresh(family), tmp_path)
    torch.testing.assert_close(logits(ours), logits(theirs), atol=ATOL, rtol=0)
    files = read_adapter(tmp_path)
    check_adapter(fresh(family), files)
    assert files.layout == (CURRENT if family == "gpt_oss" else SWAPPED)


@pytest.mark.parametrize("family", sorted(DENSE_CONFIGS))
def test_dense_families_full_coverage_peft_equal_exact_merge(family, tmp_path):
    ours = ours_all_linear(family)
    assert ours.peft_config["default"].target_parameters is None
    done, total = coverage(ours.get_base_model())
    assert done == total > 0
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(fresh(family), tmp_path)
    expected = logits(ours)
    torch.testing.assert_close(logits(theirs), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits(ours.merge_and_unload()), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", sorted(MOE_CONFIGS))
def test_preset_adapts_attention_and_experts_not_the_router_and_loads_in_peft(family, tmp_path):
    config = lorakit.LoraConfig(r=2, target_modules="preset", init_lora_weights=False)
    ours = lorakit.get_peft_model(fresh(family), config)
    adapted = our_adapted(ours)
    assert sorted(ours.peft_config["default"].target_parameters) == ["down_proj", "gate_up_proj"]
    assert any(n.endswith("experts.gate_up_proj") for n in adapted)
    assert any("attn" in n or "attention" in n for n in adapted)
    assert not any(n.endswith(("gate.weight", "router.weight")) for n in adapted)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(fresh(family), tmp_path)
    torch.testing.assert_close(logits(theirs), logits(ours), atol=ATOL, rtol=0)
