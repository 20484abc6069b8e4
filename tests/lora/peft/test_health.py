"""healthcheck() against peft 0.22's on the same model states: same finding codes and counts."""

from __future__ import annotations

import peft
import pytest
from tests.conftest import make_tiny_llama
from tests.lora.peft.peft_oracle import twin_models


def _codes(report: dict) -> list[str]:
    return sorted(f["code"] for f in report["findings"])


def _twins():
    return twin_models(make_tiny_llama(), target_modules=["q_proj", "v_proj"], r=2)


def _merged(model):
    model.merge_adapter()


def _layers(model) -> list:
    return [m for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))]


def _switch_off(layer) -> None:
    # peft's `disable_adapters` is a property over `_disable_adapters`; setting the flag alone
    # (without peft's freezing of the weights) gives both the same state.
    setattr(
        layer,
        "_disable_adapters" if hasattr(layer, "_disable_adapters") else "disable_adapters",
        True,
    )


def _disabled(model):
    for layer in _layers(model):
        _switch_off(layer)


def _one_layer_off(model):
    _switch_off(_layers(model)[0])  # one layer off, the rest on: "irregular"


def _frozen(model):
    for name, param in model.named_parameters():
        param.requires_grad_(param.requires_grad and "lora_" not in name)


def _one_tensor_frozen(model):
    next(p for n, p in model.named_parameters() if "lora_A" in n).requires_grad_(False)


@pytest.mark.parametrize(
    "change", [None, _merged, _disabled, _one_layer_off, _frozen, _one_tensor_frozen]
)
def test_findings_and_counts_equal_peft(change):
    ours, theirs = _twins()
    if change is not None:
        change(ours), change(theirs)
    mine, reference = ours.healthcheck(), theirs.healthcheck()
    assert _codes(mine) == _codes(reference)
    assert mine["is_ready"] == reference["is_ready"]
    for key in ("trainable_params", "total_params", "num_adapter_layers"):
        assert mine["summary"][key] == reference["summary"][key], key
    for key in ("enabled", "active_adapters", "merged_adapters", "available_adapters"):
        assert mine["adapter_state"][key] == reference["adapter_state"][key], key
    for key in ("requires_grad",):
        assert mine["adapter_state"][key] == reference["adapter_state"][key], key


def test_too_few_and_too_many_trainable_parameters_are_reported():
    ours, theirs = _twins()
    for kwargs in ({"min_trainable_params": 10**9}, {"max_trainable_params_percent": 0.0001}):
        assert _codes(ours.healthcheck(**kwargs)) == _codes(theirs.healthcheck(**kwargs))
    assert not ours.healthcheck(min_trainable_params=10**9)["is_ready"]


def test_print_healthcheck_writes_the_counts_through_the_sink():
    ours, _ = _twins()
    lines: list[str] = []
    ours.merge_adapter()
    ours.print_healthcheck(sink=lines.append)
    trainable, total = ours.get_nb_trainable_parameters()
    assert f"trainable: {trainable:,}" in lines[0] and f"total: {total:,}" in lines[0]
    assert "WARNING: Adapter(s) 'default' are merged" in lines[0]


def test_peft_has_the_same_entry_points():
    assert callable(peft.PeftModel.healthcheck) and callable(peft.PeftModel.print_healthcheck)
