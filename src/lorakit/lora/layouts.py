"""How adapters on parameters (`target_parameters`) lie in an adapter file: the key names, and
the two layouts peft has written for fused 3-D experts.

Key names: peft wraps each targeted parameter of a module in its own wrapper, the first
registered parameter innermost, so with parameters p_0 .. p_{n-1} of module M adapted, p_k's
tensors are `M` + `.base_layer` × (n - 1 - k) + `.lora_A.weight` / `.lora_B.weight`
(experts with gate_up_proj and down_proj: `experts.base_layer.lora_A.weight` is gate_up_proj's,
`experts.lora_A.weight` down_proj's).

Layouts of a 3-D expert stack with E experts, rank r, true input size `in`, output `out`:

- current (peft >= 0.19.1, what lorakit writes): A (E·r, in), B (out, r·E); expert e's update
  is B_e @ A_e with A_e = rows e·r .. e·r+r-1 of A, B_e = columns e, E + e, ... of B.
- swapped (peft 0.17 - 0.19.0 on (E, out, in) stacks, and peft 0.19.0 on transposed (E, in,
  out) stacks): peft took the stack's dimensions 1 and 2 as in and out in the other order, so
  A (E·r, out), B (in, r·E) and expert e's update is (B_e @ A_e)^T = A_e^T @ B_e^T.

A swapped pair becomes current with B_new_e = A_e^T and A_new_e = B_e^T, in peft's packing:
A_new[e·r + k] = B[:, k·E + e] and B_new[:, k·E + e] = A[e·r + k] (`swap_roles`, its own
inverse). A file says its writer in `peft_version` (peft >= 0.18 writes it); the shapes decide
where they differ, the version where a stack is square.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorakit.lora.config import LoraConfig
from lorakit.lora.inject import find_param_targets
from lorakit.lora.params import LoraParams, expert_count, in_out

PREFIX = "base_model.model."

# what a file lorakit writes with adapted parameters says in `peft_version`: the peft release
# whose layout its expert tensors follow (lorakit writes no version where the layout is moot)
WRITES_LAYOUT_OF = "0.22.0"
CURRENT = "current (peft >= 0.19.1)"
SWAPPED = "pre-0.19.1 (peft 0.17 - 0.19.0, in/out swapped on expert stacks)"


@dataclass(frozen=True)
class ParamSpec:
    """One adapted parameter as a file holds it: its key stem and current shapes."""

    stem: str  # file key without `.lora_A.weight`, `base_model.model.` included
    experts: int
    a_shape: tuple[int, int]  # (E·r, in)
    b_shape: tuple[int, int]  # (out, r·E)
    transposed: bool  # the stack is (E, in, out)
    stack: bool  # a 3-D expert stack (a 2-D weight has one layout only)


def key_stems(path: str, params: list[str]) -> dict[str, str]:
    """{parameter: key stem} for the adapted `params` of the module at `path`, in the
    module's registration order (peft's nesting, see the module doc)."""
    n = len(params)
    return {p: path + ".base_layer" * (n - 1 - k) for k, p in enumerate(params)}


def swap_roles(a: torch.Tensor, b: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one layout as (A, B) of the other (see the module doc); its own inverse."""
    r = a.shape[0] // experts
    new_a = b.reshape(b.shape[0], r, experts).permute(2, 1, 0).reshape(experts * r, b.shape[0])
    new_b = a.reshape(experts, r, a.shape[1]).permute(2, 1, 0).reshape(a.shape[1], r * experts)
    return new_a.contiguous(), new_b.contiguous()


def _version(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    parts = []
    for piece in str(text).split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def writer_swapped(peft_version: str | None, transposed: bool) -> bool:
    """Whether peft of `peft_version` (None: older than 0.18, which did not say) wrote a 3-D
    stack of this kind in the swapped layout."""
    version = _version(peft_version)
    if transposed:
        return version is not None and (0, 19, 0) <= version < (0, 19, 1)
    return version is None or version < (0, 19, 1)


def to_current(
    tensors: dict[str, torch.Tensor], specs: list[ParamSpec], peft_version: str | None
) -> tuple[dict[str, torch.Tensor], str | None]:
    """The file's tensors with every swapped expert pair in the current layout, and the layout
    the file used (None when it adapts no 3-D stack). Pairs of the wrong shape in both layouts
    are left for the key and shape check to report."""
    out = dict(tensors)
    layout = None
    for spec in specs:
        a_key, b_key = spec.stem + ".lora_A.weight", spec.stem + ".lora_B.weight"
        if not spec.stack or a_key not in tensors or b_key not in tensors:
            continue
        a, b = tensors[a_key], tensors[b_key]
        r = spec.a_shape[0] // spec.experts
        swapped_shapes = ((spec.experts * r, spec.b_shape[0]), (spec.a_shape[1], r * spec.experts))
        fits_current = (tuple(a.shape), tuple(b.shape)) == (spec.a_shape, spec.b_shape)
        fits_swapped = (tuple(a.shape), tuple(b.shape)) == swapped_shapes
        if fits_current and fits_swapped:
            swap = writer_swapped(peft_version, spec.transposed)
        else:
            swap = fits_swapped
        if swap:
            out[a_key], out[b_key] = swap_roles(a, b, spec.experts)
        if fits_current or fits_swapped:
            layout = SWAPPED if swap else (layout or CURRENT)
    return out, layout


def expected_parameters(
    model: nn.Module, config: LoraConfig
) -> tuple[dict[str, tuple[int, ...]], list[ParamSpec]]:
    """The file keys (without `base_model.model.`) and current shapes of the adapted
    parameters `config.target_parameters` names in `model`, and their specs."""
    by_module: dict[str, list[str]] = {}
    for name, param in find_param_targets(model, config):
        by_module.setdefault(name, []).append(param)
    expected, specs = {}, []
    for name, params in by_module.items():
        module = model.get_submodule(name)
        owner = module.base_layer if isinstance(module, LoraParams) else module
        transposed = bool(getattr(owner, "is_transposed", False))
        for param, stem in key_stems(name, params).items():
            weight = owner.get_parameter(param)
            experts, r = expert_count(weight), config.rank_for(f"{name}.{param}")
            n_in, n_out = in_out(weight, transposed)
            a_shape, b_shape = (experts * r, n_in), (n_out, r * experts)
            expected[f"{stem}.lora_A.weight"] = a_shape
            expected[f"{stem}.lora_B.weight"] = b_shape
            stack = weight.dim() == 3
            specs.append(ParamSpec(PREFIX + stem, experts, a_shape, b_shape, transposed, stack))
    return expected, specs


def param_stems(model: nn.Module, adapter_name: str) -> dict[str, tuple[LoraParams, str]]:
    """{key stem without the prefix: (wrapper, parameter)} of one adapter's parameters."""
    stems = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraParams) and adapter_name in module.r:
            for param, stem in key_stems(path, module.param_names(adapter_name)).items():
                stems[stem] = (module, param)
    return stems
