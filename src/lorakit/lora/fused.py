"""Decode steps with the LoRA layers that read one input fused into one matmul.

In a decode step every layer sees one token per batch row, so its cost is reading weights and
the overhead of each op, not arithmetic. A Llama block calls q_proj, k_proj and v_proj on one
tensor and gate_proj and up_proj on another; with packed adapters (`rows.PackedAdapters`) each
of those layers runs a base matmul, an A matmul, a mask, a B matmul and an add. `FusedDecode`
stacks the base weights of the layers that read one input together with their packed A's into
one oneDNN-prepacked matrix

    W_group = [W_q; W_k; W_v; A_q; A_k; A_v]      (sum of outs + sum of packed ranks, in)

so that one matmul gives every base output and every adapter's x @ A^T; each layer then adds
its ((x @ A^T) * M) @ B^T into its slice. The first layer of a group called on a tensor computes
the whole group and keeps the others' outputs; the others, called on that same tensor (the same
object, unmodified), take theirs. A layer called on another tensor computes its group anew, so
the result never depends on the call order, only the cost does.

Which layers read one input is learned, not assumed: the first decode step runs the ordinary
path and records which layers were called on the same tensor one after another; the groups are
built at its end (`learn()`), or when a recorded layer is called again, whichever comes first.
Layers whose adapters differ (one adapter targets q but not k), DoRA or merged adapters,
quantized or non-fp32 bases, hooks, or more packed adapter columns than half the group's
outputs (then the A's would cost more to read than they save) are left to the ordinary path;
with too many adapter columns the base weights are still stacked, and each layer adds its
adapters as packed rows do.

The weights are a snapshot, like `PackedAdapters`: build a new `FusedDecode` after loading,
deleting, merging or training adapters (the server does on every load and unload).
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import nn

from lorakit.lora.rows import PackedAdapters, RowPlan, add_rows
from lorakit.ops import PrepackedLinear, prepack_weight

_MAX_A_SHARE = 0.5  # packed A rows at most this share of the group's output rows


class FusedGroup:
    """Layers reading one input: their stacked, prepacked weight and each one's part of it."""

    def __init__(self, members: list[nn.Module], packed: PackedAdapters) -> None:
        self.members = members
        entries = [packed.get(m) for m in members]
        outs = [m.out_features for m in members]
        same = all(e is not None for e in entries) and len({e.blocks for e in entries}) == 1
        a_rows = sum(e.a.shape[0] for e in entries) if same else 0
        self.blocks = entries[0].blocks if same and a_rows <= _MAX_A_SHARE * sum(outs) else None
        parts = [m.base_layer.weight.detach() for m in members]
        if self.blocks is not None:
            parts += [e.a for e in entries]
            self.b_t = [e.b.T for e in entries]  # (packed ranks, out) views
            self.ranks = entries[0].a.shape[0]
        weight = torch.cat(parts)
        self.weight = prepack_weight(weight)
        self.nbytes = weight.numel() * weight.element_size()
        biases = [m.base_layer.bias for m in members]
        self.bias = None
        if any(b is not None for b in biases):
            own = [
                torch.zeros(n) if b is None else b.detach()
                for b, n in zip(biases, outs, strict=True)
            ]
            self.bias = torch.cat([*own, torch.zeros(weight.shape[0] - sum(outs))])  # A's: none
        self.sizes = outs + [weight.shape[0] - sum(outs)]  # y's columns: each member, the A's

    def run(self, x: torch.Tensor, plan: RowPlan) -> list[torch.Tensor]:
        """Every member's output for x (rows, in), one token per plan row."""
        y = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        *outs, ax = y.split_with_sizes(self.sizes, 1)  # views (Tensor.split is Python); ax:
        # every member's x @ A^T
        if self.blocks is None:  # base weights stacked; adapters as packed rows add them
            return [add_rows(m, out, x, plan) for m, out in zip(self.members, outs, strict=True)]
        mask = plan.block_mask(self.blocks, len(self.members))  # each row's scaling, per member
        h = (ax * mask).view(len(ax), -1, self.ranks).unbind(1)  # (rows, packed ranks) each
        for h_i, b_t, out in zip(h, self.b_t, outs, strict=True):
            out.addmm_(h_i, b_t)  # into y's columns
        return outs


class _Kept(threading.local):
    """The outputs a group computed for its other members, per thread."""

    def __init__(self) -> None:
        self.x: weakref.ref | None = None
        self.version = -1
        self.outputs: dict[nn.Module, torch.Tensor] = {}


class FusedDecode:
    """Fused groups over a model's LoRA layers for decode steps (see the module's text)."""

    def __init__(self, layers: list[nn.Module], packed: PackedAdapters) -> None:
        self._layers = {layer for layer in layers if _eligible(layer)}
        self._packed = packed
        self._groups: dict[nn.Module, FusedGroup] | None = None  # None until learned
        self._calls: list[tuple[torch.Tensor, int, nn.Module]] = []
        self._recorded: set[nn.Module] = set()
        self._reported = False  # whether learn() has returned True
        self._kept = _Kept()

    @property
    def nbytes(self) -> int:
        """Bytes of the stacked, prepacked weights."""
        groups = {id(g): g for g in (self._groups or {}).values()}
        return sum(g.nbytes for g in groups.values())

    def grouped_bases(self) -> list[nn.Module]:
        """The base layers the groups compute (their own prepacked copies go unused)."""
        return [m.base_layer for m in (self._groups or {})]

    def forward(self, layer: nn.Module, x: torch.Tensor, plan: RowPlan) -> torch.Tensor | None:
        """The layer's output for x from its group, or None for the ordinary path."""
        if (
            layer not in self._layers
            or torch.is_grad_enabled()
            or x.dtype != torch.float32
            or x.numel() != plan.rows * layer.in_features  # one token per row: a decode step
        ):
            return None
        version = _version(x)
        if self._groups is None and layer in self._recorded:  # a second step: learning is over
            self._build()
        if self._groups is None:  # learning: record the call, run the ordinary path
            self._calls.append((x, version, layer))
            self._recorded.add(layer)
            return None
        group = self._groups.get(layer)
        if group is None:
            return None
        kept = self._kept
        if kept.x is not None and kept.x() is x and kept.version == version:
            out = kept.outputs.pop(layer, None)
            if out is not None:
                return out
        outs = group.run(x.reshape(plan.rows, -1), plan)
        shape = x.shape[:-1]
        outputs = {m: o.view(*shape, o.shape[-1]) for m, o in zip(group.members, outs, strict=True)}
        mine = outputs.pop(layer)
        kept.x, kept.version, kept.outputs = weakref.ref(x), version, outputs
        return mine

    def learn(self) -> bool:
        """End the learning step: group the layers called one after another on one tensor.
        Returns True the first time it is called after the groups exist."""
        if self._groups is None:
            self._build()
        reported, self._reported = self._reported, True
        return not reported

    def _build(self) -> None:
        runs: list[list[nn.Module]] = []
        last = None
        for x, version, layer in self._calls:
            if last is not None and last[0] is x and last[1] == version and layer not in runs[-1]:
                runs[-1].append(layer)
            else:
                runs.append([layer])
            last = (x, version)
        self._calls, self._recorded = [], set()
        groups: dict[nn.Module, FusedGroup] = {}
        with torch.no_grad():
            for members in runs:
                if any(m in groups for m in members) or len({m.in_features for m in members}) > 1:
                    continue
                group = FusedGroup(members, self._packed)
                if group.weight is None or (len(members) == 1 and group.blocks is None):
                    continue  # nothing gained over the ordinary path
                groups.update(dict.fromkeys(members, group))
        self._groups = groups


def _version(x: torch.Tensor) -> int:
    """x's version counter; inference-mode tensors have none (they are not modified between
    the calls of one group in the models served)."""
    return -1 if x.is_inference() else x._version


def _eligible(layer: nn.Module) -> bool:
    """A LoRA layer over a plain fp32 CPU linear, no DoRA or merged adapters, no hooks."""
    base = getattr(layer, "base_layer", None)
    return (
        type(base) in (nn.Linear, PrepackedLinear)
        and base.weight.dtype == torch.float32
        and base.weight.device.type == "cpu"
        and getattr(layer, "packable", False)
        and not (layer._forward_hooks or layer._forward_pre_hooks)
        and not (base._forward_hooks or base._forward_pre_hooks)
    )
