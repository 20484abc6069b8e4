"""Hot paths: a cross-entropy that never holds full logits, and fast linear layers for inference.

For hidden states h (N, H) at supervised positions, output weight W (V, H) and targets y (N,):

    loss = sum_i [ logsumexp_v (h_i . W_v) - h_i . W_{y_i} ]
    dloss/dlogits = softmax(logits) - onehot(y)

`linear_cross_entropy` computes both in one pass, `chunk_size` rows at a time, so at most
(chunk_size, V) fp32 logits exist at once and none are kept for backward: the gradients with
respect to h (and W, when it is trained) are accumulated during the forward and scaled in
backward. `causal_lm_loss` runs a Hugging Face causal LM's decoder, keeps only positions whose
shifted label is not -100 (and not the first token of a packed sample), and applies it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
FEW_ROWS = 32  # the most rows for which `few_rows` holds (a decode step's batch)


def few_rows(x: torch.Tensor) -> bool:
    """True for a 2-d CPU input of 2 to FEW_ROWS rows outside autograd (a decode step).

    For so few rows, MKL computes x @ W^T 1.1-3.6x slower than (W @ x^T)^T on the CPUs
    measured (benchmarks/bench_serve.py; a 49152 x 576 output layer at 8 rows: 18 ms vs 9 ms),
    so inference paths with few rows use the second form. One row (a matrix-vector product)
    and many rows are as fast either way.
    """
    return x.device.type == "cpu" and 1 < x.shape[0] <= FEW_ROWS and not torch.is_grad_enabled()


def prepack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's prepacked form of an fp32 CPU linear weight (out, in); None where there is none.

    For a decode step's few rows, oneDNN with a prepacked weight runs x @ W^T 1.4-2.9x faster
    than MKL on the CPUs measured (benchmarks/bench_serve.py; a 49152 x 576 output layer at 8
    rows: 22 ms vs 7.5 ms), and is no slower for one row or for a prefill's many rows.
    """
    mkldnn = getattr(torch.ops, "mkldnn", None)
    if (
        weight.device.type != "cpu"
        or weight.dtype != torch.float32
        or weight.dim() != 2
        or not torch.backends.mkldnn.is_available()
        or mkldnn is None
    ):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), FEW_ROWS)
    except (RuntimeError, AttributeError):  # a torch build without this operator
        return None


class PrepackedLinear(nn.Linear):
    """An nn.Linear computing with its prepacked weight outside autograd (`PrepackedLinears`)."""

    _lorakit_packed: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if torch.is_grad_enabled() or x.dtype != torch.float32 or x.device.type != "cpu":
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(
            flat, self._lorakit_packed, self.bias, "none", [], ""
        )
        return out.view(*x.shape[:-1], self.out_features)


class PrepackedLinears:
    """Plain nn.Linear layers with a prepacked copy of each fp32 CPU weight, for inference.

    The copies cost as much memory again as those weights; they are a snapshot, so build a new
    one after changing the weights. `with packs.active():` swaps the layers' class to
    `PrepackedLinear` and back on exit: parameters, tied weights and hooks stay.
    """

    def __init__(self, linears: list[nn.Linear]) -> None:
        self.linears = []
        self._dropped: list[nn.Module] = []
        for module in linears:
            packed = prepack_weight(module.weight)
            if packed is not None:
                module._lorakit_packed = packed
                self.linears.append(module)

    @property
    def nbytes(self) -> int:
        """Bytes the prepacked copies take (the same as the plain weights)."""
        return sum(m.weight.numel() * m.weight.element_size() for m in self.linears)

    def drop(self, modules: list[nn.Module]) -> None:
        """Give up the copies of these layers (computed another way) until `restore()`."""
        gone = set(modules)
        for module in self.linears:
            if module in gone:
                del module._lorakit_packed
                self._dropped.append(module)
        self.linears = [m for m in self.linears if m not in gone]

    def restore(self) -> None:
        """Prepack the dropped layers again (their weights as they are now)."""
        dropped, self._dropped = self._dropped, []
        self.linears.extend(PrepackedLinears(dropped).linears)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Within the context the layers compute with their prepacked weights."""
        swap = object.__setattr__  # nn.Module's __setattr__ costs ~5 us a call, twice a step
        for module in self.linears:
            swap(module, "__class__", PrepackedLinear)
        try:
            yield
        finally:
            for module in self.linears:
                swap(module, "__class__", nn.Linear)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of (h @ W.T + b) against targets, gradients computed chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, compute_dtype):  # noqa: D102
        n = hidden.shape[0]
        w = weight.to(compute_dtype)  # (V, H)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, chunk_size):
                h = hidden[start : start + chunk_size].to(compute_dtype)  # (C, H)
                y = targets[start : start + chunk_size]  # (C,)
                logits = (h @ w.T).float()  # (C, V)
                if bias is not None:
                    logits += bias.float()
                lse = torch.logsumexp(logits, dim=-1)  # (C,)
                total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
                if not (need_h or need_w or need_b):
                    continue
                # logits becomes dloss/dlogits in place: softmax - onehot.
                logits.sub_(lse[:, None]).exp_()
                logits[torch.arange(len(y), device=y.device), y] -= 1.0
                if need_h:
                    grad_h[start : start + chunk_size] = (logits.to(compute_dtype) @ w).to(
                        hidden.dtype
                    )
                if need_w:
                    grad_w += logits.T @ h.float()
                if need_b:
                    grad_b += logits.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(w_dtype) if grad_w is not None else None
        gb = (grad_b * grad_out).to(b_dtype) if grad_b is not None else None
        return gh, gw, gb, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T (+ bias)` against `targets`, chunked.

    hidden (N, H), weight (V, H), targets (N,) long with no ignored entries. Matmuls run in the
    autocast dtype when autocast is on (as `nn.Linear` would), the softmax always in fp32.
    """
    if hidden.ndim != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"linear_cross_entropy expects hidden (N, H) and targets (N,); got "
            f"{tuple(hidden.shape)} and {tuple(targets.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    if hidden.shape[0] == 0:
        return (hidden.sum() * 0.0 + weight.sum() * 0.0).float()
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_size, compute_dtype)


def _head_cross_entropy(
    hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """Summed cross-entropy through an arbitrary head module, recomputing chunk logits in
    backward (activation checkpointing) so they are never all held at once."""
    from torch.utils.checkpoint import checkpoint

    def chunk_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h).float(), y, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        total = total + checkpoint(chunk_loss, h, y, use_reentrant=False)
    return total


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The Hugging Face `*ForCausalLM` inside `model` (a LoraModel or DDP wrapper allowed).

    A LoraModel is a `PreTrainedModel` in type only; wrappers are told apart by `get_base_model`.
    """
    from transformers import PreTrainedModel

    seen = 0
    while (not isinstance(model, PreTrainedModel) or hasattr(model, "get_base_model")) and seen < 4:
        getter = getattr(model, "get_base_model", None)  # a LoraModel: the model it wraps
        inner = getter() if callable(getter) else getattr(model, "module", None)
        inner = inner if inner is not None else getattr(model, "base_model", None)
        if inner is None or inner is model:
            break
        model, seen = inner, seen + 1
    return model


def generation_kwargs(model: nn.Module) -> dict[str, Any]:
    """Keywords for `generate` on `model`: a mixture of experts whose config sets
    `output_router_logits` gets it turned off, since transformers' forward then computes its
    balance loss on each cached step against the whole attention mask, and fails."""
    config = getattr(unwrap_causal_lm(model), "config", None)
    return {"output_router_logits": False} if getattr(config, "output_router_logits", 0) else {}


def supervised_targets(
    labels: torch.Tensor, position_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean mask (B, T) of positions that predict a supervised next token, and the
    flattened targets at those positions (shifted by one, first token of packed samples
    excluded)."""
    nxt = labels[:, 1:]  # (B, T-1): the token each position predicts
    keep = nxt != IGNORE_INDEX
    if position_ids is not None:
        keep &= position_ids[:, 1:] != 0  # no prediction across a packed-sample boundary
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = keep
    return mask, nxt[keep]


def _fsdp(module: nn.Module) -> bool:
    """True for a module `torch.distributed.fsdp.fully_shard` has sharded."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def causal_lm_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = 1024
) -> tuple[torch.Tensor, int]:
    """(summed next-token cross-entropy, number of supervised tokens) for one batch.

    Runs the decoder only, gathers supervised positions, then the output head chunk by chunk.
    """
    loss, n, _ = causal_lm_outputs(model, batch, chunk_size)
    return loss, n


def causal_lm_outputs(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    chunk_size: int = 1024,
    router_logits: bool = False,
) -> tuple[torch.Tensor, int, tuple[torch.Tensor, ...] | None]:
    """`causal_lm_loss`'s (loss sum, tokens) and, with `router_logits`, the router logits of
    every MoE layer (each (batch * length, experts)), from the same forward pass."""
    lm = unwrap_causal_lm(model)
    decoder = lm.base_model  # HF: the bare transformer (`model.model`, `model.transformer`)
    head = lm.get_output_embeddings()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    if router_logits:
        inputs["output_router_logits"] = True
    mask, targets = supervised_targets(batch["labels"], batch.get("position_ids"))
    # An FSDP2-sharded model runs whole: its root's hooks gather the head's shards, which the
    # chunked path (reading head.weight outside any forward) would bypass.
    if getattr(lm.config, "final_logit_softcapping", None) or decoder is lm or _fsdp(lm):
        out = model(**inputs, use_cache=False)
        logits = out.logits  # (B, T, V): no chunked path
        loss = F.cross_entropy(logits[mask].float(), targets, reduction="sum")
        return loss, int(targets.numel()), _router_logits(out, router_logits)
    out = decoder(**inputs, use_cache=False)
    selected = out.last_hidden_state[mask]  # (N, H) supervised positions only
    if type(head) is nn.Linear:
        loss = linear_cross_entropy(selected, head.weight, targets, head.bias, chunk_size)
    else:  # e.g. a LoRA-wrapped lm_head: run the module itself, chunk by chunk
        loss = _head_cross_entropy(selected, head, targets, chunk_size)
    return loss, int(targets.numel()), _router_logits(out, router_logits)


def _router_logits(out: Any, wanted: bool) -> tuple[torch.Tensor, ...] | None:
    """The router logits of a forward's output when they were asked for; a model that was asked
    and returned none is not a mixture of experts transformers knows how to report."""
    if not wanted:
        return None
    logits = getattr(out, "router_logits", None)
    if not logits:
        raise ValueError(
            f"the model returned no router logits for output_router_logits=True "
            f"({type(out).__name__}); set output_router_logits=false in its config"
        )
    return tuple(logits)
