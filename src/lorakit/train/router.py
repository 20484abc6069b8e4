"""The router load-balancing loss of mixture-of-experts models, added to the training loss.

transformers' MoE causal LMs (Mixtral, Qwen2/3-MoE, OLMoE, Granite-MoE, gpt-oss, ...) add
`router_aux_loss_coef * aux` to their loss when their config sets `output_router_logits`. The
balance term (Switch Transformer's) reads the router logits of every MoE layer, one row per
token and layer, padding left out:

    p = softmax(router logits of the row)          (experts,)
    f_e = (rows that route a top-k slot to e) / rows    (the f_e sum to k)
    P_e = mean of p_e over the rows
    aux = experts * sum_e f_e * P_e

It is 1 * k when routing is uniform and grows as a few experts take most tokens. Only P carries
a gradient (the top-k choice has none).

In the loop each micro-batch adds `coef * aux * (its supervised tokens / the global batch's)`,
so with one micro-batch the step's objective is transformers' own `loss` (mean cross-entropy +
coef * aux), and accumulation or more processes give the token-weighted mean of the micro-batches'
balance terms. The logged `loss` stays the cross-entropy (comparable with `eval_loss` and
perplexity); `aux_loss` is logged beside it, unscaled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import ConfigError
from lorakit.ops import causal_lm_outputs, unwrap_causal_lm


@dataclass(frozen=True)
class RouterLoss:
    """What the balance term needs: its weight, the number of experts and of experts per token."""

    coef: float
    num_experts: int
    top_k: int

    @classmethod
    def of(cls, model: nn.Module) -> RouterLoss | None:
        """The model's settings when its config asks for the loss (`output_router_logits`), else
        None. The numbers are read where transformers' own forward reads them."""
        lm = unwrap_causal_lm(model)
        config = getattr(lm, "config", None)
        if not getattr(config, "output_router_logits", False):
            return None
        coef = _first(lm, config, ("router_aux_loss_coef",))
        experts = _first(lm, config, ("num_experts", "num_local_experts", "n_routed_experts"))
        top_k = _first(lm, config, ("num_experts_per_tok", "top_k", "moe_topk"))
        missing = [
            key
            for key, value in (
                ("router_aux_loss_coef", coef),
                ("num_experts", experts),
                ("num_experts_per_tok", top_k),
            )
            if value is None
        ]
        if missing:
            raise ConfigError(
                f"the model config sets output_router_logits=true but has no "
                f"{', '.join(missing)}; set them in config.json, or set output_router_logits "
                "to false to train without the router load-balancing loss"
            )
        return cls(float(coef), int(experts), int(top_k))

    def loss(
        self, router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The balance term (fp32 scalar) over every layer's router logits."""
        return balance_loss(router_logits, self.num_experts, self.top_k, attention_mask)

    def describe(self) -> str:
        """One line for the run's log."""
        return (
            f"router load-balancing loss: {self.coef:g} * aux_loss added to the loss "
            f"({self.num_experts} experts, {self.top_k} per token; output_router_logits in the "
            "model config)"
        )


def _first(lm: nn.Module, config: object, names: tuple[str, ...]) -> object | None:
    """The first of `names` set on the causal LM itself, else on its config."""
    for owner in (lm, config):
        for name in names:
            value = getattr(owner, name, None)
            if value is not None and not isinstance(value, nn.Module):
                return value
    return None


def balance_loss(
    router_logits: tuple[torch.Tensor, ...],
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """experts * sum_e f_e * P_e over all layers' rows (module docstring), in fp32.

    router_logits: one (batch * length, experts) tensor per layer; attention_mask (batch,
    length): rows where it is 0 are left out.
    """
    device = router_logits[0].device
    weight = None
    if attention_mask is not None:
        weight = attention_mask.reshape(-1, 1).to(device=device, dtype=torch.float32)
    hits = torch.zeros(num_experts, dtype=torch.float32, device=device)
    probs = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    for logits in router_logits:
        p = torch.softmax(logits.to(device).float(), dim=-1)  # (N, E)
        chosen = torch.topk(p.detach(), top_k, dim=-1).indices  # (N, k)
        routed = F.one_hot(chosen, num_experts).sum(dim=1).float()  # (N, E): slots per expert
        if weight is not None:
            routed, p = routed * weight, p * weight
            rows = rows + weight.sum()
        else:
            rows = rows + p.shape[0]
        hits = hits + routed.sum(dim=0)
        probs = probs + p.sum(dim=0)
    return num_experts * torch.sum((hits / rows) * (probs / rows))


def micro_batch_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    chunk_size: int,
    n_global: int,
    router: RouterLoss | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """(objective to backpropagate, summed cross-entropy, balance term or None, supervised
    tokens) of one micro-batch whose global batch has `n_global` supervised tokens."""
    loss_sum, n, logits = causal_lm_outputs(model, batch, chunk_size, router is not None)
    objective = loss_sum / n_global
    aux = None
    if router is not None:
        aux = router.loss(logits, batch.get("attention_mask"))
        objective = objective + router.coef * aux * (n / n_global)
    return objective, loss_sum, aux, n
