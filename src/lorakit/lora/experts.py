"""The lean forward of fused experts carrying LoRA: each expert's tokens go through its base
slice and its own low-rank factors, so W_e + B_e A_e is never formed.

For a transformers 5 experts module (the classes `use_experts_implementation` decorates, which
say `has_gate`, `has_bias`, `is_transposed`), with tokens x routed to expert e:

    h = x W_gu[e]^T (+ bias) + sum_a scaling_a · (x A_a,e^T) B_a,e^T    (gate_up_proj or up_proj)
    h = gate(h) or act(h);  y = h W_d[e]^T (+ bias) + the same LoRA term for down_proj
    out[token] += routing weight · y  (after the expert's norm, where it has one)

which is transformers' own per-expert computation (the one every experts implementation of
the decorated classes agrees with) plus LoRA. Memory: the activations and the factors, not a
second copy of the expert stack that the W + dW route keeps for the backward pass. Modules it
does not know (or expert-parallel ones) take `params.effective`'s route instead. A quantized
expert store is read one expert at a time through its `expert_weight(name, e)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")


def expert_factors(
    a: torch.Tensor, b: torch.Tensor, experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_e stacked (E, r, in), B_e stacked (E, out, r)) as views of peft's A and B."""
    a3 = a.view(experts, -1, a.shape[-1])
    b3 = b.view(b.shape[0], -1, experts).permute(2, 0, 1)
    return a3, b3


def can_run(module: nn.Module, params: list[str]) -> bool:
    """Whether `module` is a decorated experts module whose adapted parameters this forward
    covers (its projections, not its biases)."""
    known = all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed"))
    return (
        known
        and not getattr(module, "_is_expert_parallel", False)
        and set(params) <= set(_PROJECTIONS)
        and hasattr(module, "down_proj")
    )


def _routing(args, kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    names = (
        ("hidden_states",),
        ("top_k_index", "router_indices"),
        ("top_k_weights", "routing_weights"),
    )
    values = list(args[:3])
    for aliases in names[len(values) :]:
        found = [kwargs[a] for a in aliases if kwargs.get(a) is not None]
        if not found:
            return None
        values.append(found[0])
    return tuple(values)


def expert_weight(module: nn.Module, name: str, e: int) -> torch.Tensor:
    """Expert e's slice of stack `name`, as stored ((out, in), or (in, out) when transposed).
    A module that stores its experts otherwise (quantized, per expert) offers
    `expert_weight(name, e)` returning that slice in float, and is read through it."""
    own = getattr(module, "expert_weight", None)
    return own(name, e) if callable(own) else getattr(module, name)[e]


def _project(module, name: str, x: torch.Tensor, e: int, updates: dict) -> torch.Tensor:
    """x through expert e's `name` projection, its bias and the adapters' factors."""
    weight = expert_weight(module, name, e)
    out = x @ weight if module.is_transposed else F.linear(x, weight)
    if module.has_bias:
        out = out + getattr(module, f"{name}_bias")[e]
    for a, b, scale in updates.get(name, ()):
        a3, b3 = expert_factors(a, b, getattr(module, name).shape[0])
        h = F.linear(x.to(a.dtype), a3[e]) * scale
        out = out + F.linear(h, b3[e]).to(out.dtype)
    return out


def forward(module: nn.Module, updates: dict, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The experts' output with LoRA (see the module doc), or None when the call's arguments are
    not the (hidden states, expert indices, routing weights) this forward knows."""
    routing = _routing(args, kwargs)
    if routing is None or len(args) > 3:
        return None
    hidden, index, weights = routing
    final = torch.zeros_like(hidden)
    experts = module.down_proj.shape[0]
    up = "gate_up_proj" if module.has_gate else "up_proj"
    for e in torch.unique(index).tolist():
        if e >= experts:
            continue  # a slot no local expert serves
        token, slot = torch.where(index == e)
        h = _project(module, up, hidden[token], e, updates)
        h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
        y = _project(module, "down_proj", h, e, updates)
        if getattr(module, "has_post_expert_norm", False):
            y = module.post_expert_norm(y)
        y = y * weights[token, slot, None]
        final.index_add_(0, token, y.to(final.dtype))
    return final
