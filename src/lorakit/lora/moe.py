"""Mixture-of-experts models as LoRA sees them: which parameters are experts and routers, what
`all-linear` adds on them, and how much of a decoder an adapter covers.

In transformers 5 an MoE block holds its experts as fused 3-D parameters (`experts.gate_up_proj`,
`experts.down_proj`, one slice per expert) and a router whose `weight` (experts, hidden) is a
plain parameter of a module that is not an `nn.Linear`. `all-linear` reaches the linear layers
by module and these by `target_parameters` (`lora/params.py`).
"""

from __future__ import annotations

from torch import nn

from lorakit.lora.layers import LoraEmbedding, LoraLinear
from lorakit.lora.params import LoraParams


def _owned(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    base = module.base_layer if isinstance(module, LoraParams) else module
    return list(base.named_parameters(recurse=False))


def expert_parameters(model: nn.Module) -> list[tuple[str, str]]:
    """(module name, parameter name) of every fused expert weight (3-D, not a bias) and of every
    router weight beside it (a 2-D `weight` of a non-Linear sibling, one row per expert)."""
    found: list[tuple[str, str]] = []
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if ".base_layer." in f".{name}.":
            continue
        if isinstance(module, nn.modules.conv._ConvNd):
            continue  # a convolution's 3-D weight is not a stack of experts
        stacks = [(p, t) for p, t in _owned(module) if t.dim() == 3 and not p.endswith("bias")]
        if not stacks:
            continue
        found += [(name, p) for p, _ in stacks]
        parent_name = name.rpartition(".")[0]
        parent = modules.get(parent_name, model)
        experts = stacks[0][1].shape[0]
        for child_name, child in parent.named_children():
            weight = dict(_owned(child)).get("weight")
            if isinstance(child, nn.Linear) or weight is None or child is module:
                continue
            if weight.dim() == 2 and weight.shape[0] == experts:
                found.append((f"{parent_name}.{child_name}".lstrip("."), "weight"))
    return found


def all_linear_parameters(model: nn.Module) -> list[str]:
    """The `target_parameters` entries `all-linear` adds: expert stacks by their parameter name
    ('gate_up_proj', 'down_proj'), routers as '<router name>.weight' ('gate.weight'), as peft
    names them. Empty for a dense model."""
    names = set()
    for module_name, param in expert_parameters(model):
        names.add(param if param != "weight" else f"{module_name.rpartition('.')[2]}.weight")
    return sorted(names)


def coverage(model: nn.Module) -> tuple[int, int]:
    """(weights adapted, weights in all) of the decoder, in elements: every parameter of 2 or
    more dimensions outside the embeddings, the output head and convolutions (biases not
    counted: gpt-oss keeps its experts' biases as 2-D tensors). A weight is adapted when a
    `LoraLinear` wraps its layer or a `LoraParams` adapts it."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = {id(p) for p in (head.parameters() if head is not None else [])}
    for module in model.modules():
        if isinstance(module, (nn.Embedding, LoraEmbedding)):
            skip.update(id(p) for p in module.parameters())
    adapted, total = set(), 0
    for module in model.modules():
        if isinstance(module, LoraParams):
            adapted.update(id(module.base_param(p)) for p in module.param_names())
        elif isinstance(module, LoraLinear) and module.r:
            adapted.update(id(p) for p in module.base_layer.parameters(recurse=False))
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            skip.update(id(p) for p in module.parameters())  # kernels, not weight matrices
    seen = set()
    done = 0
    for name, param in model.named_parameters():
        if param.dim() < 2 or id(param) in skip or id(param) in seen or "lora_" in name:
            continue
        if name.endswith("bias"):
            continue
        if ".modules_to_save." in name:
            continue
        seen.add(id(param))
        total += param.numel()
        done += param.numel() if id(param) in adapted else 0
    return done, total
