"""Adapter files of LoRA on parameters (`lora/layouts.py`): key names, the two expert layouts,
how a file's layout is told."""

from __future__ import annotations

import torch

from lorakit.lora.layouts import (
    CURRENT,
    SWAPPED,
    ParamSpec,
    key_stems,
    swap_roles,
    to_current,
    writer_swapped,
)

E, R = 3, 2


def test_key_stems_follow_peft_nesting():
    stems = key_stems("m.experts", ["gate_up_proj", "down_proj"])
    assert stems == {"gate_up_proj": "m.experts.base_layer", "down_proj": "m.experts"}
    assert key_stems("m.gate", ["weight"]) == {"weight": "m.gate"}


def test_swap_roles_keeps_every_experts_update_and_is_its_own_inverse():
    a, b = torch.randn(E * R, 5), torch.randn(7, R * E)  # current: in 5, out 7
    old_a, old_b = swap_roles(a, b, E)
    assert old_a.shape == (E * R, 7) and old_b.shape == (5, R * E)
    for e in range(E):
        current = b[:, e::E] @ a[e * R : (e + 1) * R]  # (out, in)
        old = old_b[:, e::E] @ old_a[e * R : (e + 1) * R]  # (in, out), the transpose
        torch.testing.assert_close(old.T, current)
    back_a, back_b = swap_roles(old_a, old_b, E)
    assert torch.equal(back_a, a) and torch.equal(back_b, b)


def test_which_peft_versions_wrote_the_swapped_layout():
    assert writer_swapped(None, transposed=False)  # before 0.18, no version written
    assert writer_swapped("0.18.1", transposed=False)
    assert writer_swapped("0.19.0", transposed=False)
    assert not writer_swapped("0.19.1", transposed=False)
    assert not writer_swapped("0.22.0", transposed=False)
    assert not writer_swapped("0.18.1", transposed=True)  # (E, in, out) stacks: 0.19.0 only
    assert writer_swapped("0.19.0", transposed=True)
    assert not writer_swapped("0.20.0.dev0", transposed=True)


def _file(a, b):
    return {"base_model.model.x.lora_A.weight": a, "base_model.model.x.lora_B.weight": b}


def test_shapes_decide_where_they_differ_and_the_version_where_square():
    spec = ParamSpec("base_model.model.x", E, (E * R, 5), (7, R * E), False, True)
    a, b = torch.randn(E * R, 5), torch.randn(7, R * E)
    old = _file(*swap_roles(a, b, E))
    out, layout = to_current(old, [spec], "0.22.0")  # the shapes say swapped, whatever the version
    assert layout == SWAPPED and torch.equal(out["base_model.model.x.lora_A.weight"], a)
    out, layout = to_current(_file(a, b), [spec], None)
    assert layout == CURRENT and torch.equal(out["base_model.model.x.lora_B.weight"], b)
    square = ParamSpec("base_model.model.x", E, (E * R, 6), (6, R * E), False, True)
    a, b = torch.randn(E * R, 6), torch.randn(6, R * E)
    assert to_current(_file(a, b), [square], "0.22.0")[1] == CURRENT
    out, layout = to_current(_file(*swap_roles(a, b, E)), [square], "0.18.0")
    assert layout == SWAPPED and torch.equal(out["base_model.model.x.lora_A.weight"], a)


def test_two_d_weights_have_one_layout():
    spec = ParamSpec("base_model.model.x", 1, (R, 5), (4, R), False, False)
    tensors = _file(torch.randn(R, 5), torch.randn(4, R))
    assert to_current(tensors, [spec], None) == (tensors, None)


def test_a_saved_expert_adapter_names_its_layout_and_reads_back_on_square_stacks(tmp_path):
    import json

    import lorakit
    from lorakit.lora.adapters import check_adapter, read_adapter
    from moe_models import tiny_model

    model = tiny_model("qwen3_moe")  # gate_up_proj (4, 24, 16), down_proj (4, 16, 12)
    config = lorakit.LoraConfig(r=2, target_parameters=["gate_up_proj"], init_lora_weights=False)
    lora = lorakit.get_peft_model(model, config)
    lora.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_version"] >= "0.19.1"
    files = read_adapter(tmp_path)
    check_adapter(lora.get_base_model(), files)
    assert files.layout == CURRENT
