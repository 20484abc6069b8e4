"""The lean experts forward (`lora/experts.py`): equal to the W + dW route on every MoE
family, in outputs and gradients, while keeping no W + dW stack for the backward pass."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from lorakit.lora import experts
from lorakit.lora.params import LoraParams
from moe_models import MOE_CONFIGS, tiny_model

IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def _model(family: str):
    config = lorakit.LoraConfig(
        r=2, target_modules=["o_proj"], target_parameters=["gate_up_proj", "down_proj"]
    )
    config.init_lora_weights = False
    return lorakit.get_peft_model(tiny_model(family), config)


def _set_lean(model, lean: bool) -> None:
    for module in model.modules():
        if isinstance(module, LoraParams):
            module.lean = lean


def _saved_bytes(model) -> tuple[torch.Tensor, int, dict]:
    """(loss, bytes of computed expert stacks (3-D, W + dW) autograd keeps for backward,
    gradients of the factors)."""
    stacks = {}
    shapes = {
        tuple(m.base_param(p).shape)
        for m in model.modules()
        if isinstance(m, LoraParams)
        for p in m.param_names()
    }

    def pack(tensor):
        base = tensor._base if tensor._base is not None else tensor
        if tuple(base.shape) in shapes and not base.is_leaf:  # a stack computed in the forward
            stacks[id(base)] = base.numel() * base.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(IDS, labels=IDS).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), sum(stacks.values()), grads


@pytest.mark.parametrize("family", sorted(MOE_CONFIGS))
def test_lean_forward_equals_the_weight_route_and_forms_no_stack(family):
    lean = _model(family)
    wrapped = [m for m in lean.modules() if isinstance(m, LoraParams)]
    assert all(experts.can_run(m.base_layer, m.param_names()) for m in wrapped)
    full = copy.deepcopy(lean)
    _set_lean(full, False)
    lean_loss, lean_bytes, lean_grads = _saved_bytes(lean)
    full_loss, full_bytes, full_grads = _saved_bytes(full)
    torch.testing.assert_close(lean_loss, full_loss)
    assert lean_grads.keys() == full_grads.keys() and lean_grads
    for name, grad in lean_grads.items():
        torch.testing.assert_close(grad, full_grads[name], atol=1e-5, rtol=1e-4)
    assert lean_bytes == 0 < full_bytes  # no W + dW kept for backward


def test_modules_it_does_not_know_take_the_weight_route():
    assert not experts.can_run(torch.nn.Linear(2, 2), ["weight"])
    module = tiny_model("qwen3_moe").model.layers[0].mlp.experts
    assert experts.can_run(module, ["gate_up_proj"])
    module._is_expert_parallel = True
    assert not experts.can_run(module, ["gate_up_proj"])


def test_an_expert_store_of_its_own_is_read_one_slice_at_a_time():
    lora = _model("qwen3_moe")
    with torch.no_grad():
        reference = lora(IDS).logits
    calls = []
    for module in lora.modules():
        if isinstance(module, LoraParams):
            base = module.base_layer
            stored = {n: base.get_parameter(n).detach().clone() for n in module.param_names()}
            with torch.no_grad():
                for n in stored:
                    base.get_parameter(n).zero_()  # only the store holds the weights now

            def read(name, e, stored=stored):
                calls.append((name, e))
                return stored[name][e]

            base.expert_weight = read
    with torch.no_grad():
        logits = lora(IDS).logits
    torch.testing.assert_close(logits, reference)
    assert {name for name, _ in calls} == {"gate_up_proj", "down_proj"}


def test_a_batch_mixing_adapters_on_an_moe_model_gives_each_row_its_own():
    config = lorakit.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False)
    lora = lorakit.get_peft_model(tiny_model("qwen3_moe"), config)
    lora.add_adapter("b", lorakit.LoraConfig(r=3, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if (name.endswith(".b") or ".b." in name) and "lora_B" in name:
                param.normal_(0, 0.5)  # adapter b does something
        ids = IDS[:1].repeat(3, 1)
        mixed = lora(ids, adapter_names=["default", "b", "__base__"]).logits
        alone = {}
        for name in ("default", "b"):
            lora.set_adapter(name)
            alone[name] = lora(ids).logits
        with lora.disable_adapter():
            base = lora(ids).logits
    torch.testing.assert_close(mixed[0], alone["default"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1], alone["b"][1], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[2], base[2], atol=1e-5, rtol=0)
    assert (alone["default"][0] - alone["b"][1]).abs().max() > 1e-3
