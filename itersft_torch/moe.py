"""The MoE load-balancing loss of ``step()`` on the PyTorch engine, as the JAX engine computes it.

transformers adds ``router_aux_loss_coef * load_balancing_loss_func(router_logits, attention_mask)`` to a MoE model's
loss per forward when ``output_router_logits`` is on. ``step()``'s loss is the *update's* (token-weighted over its
micro-batches, whatever the split), so the load-balancing loss is the update's too: ``E * sum_e f_e * P_e`` with
``f_e`` (top-k assignments) and ``P_e`` (router probabilities) over every real token of the update. An update of one
micro-batch uses transformers' own ``aux_loss``; with several, a first pass without gradients counts the update's
assignments, and each micro-batch adds its probabilities' share (``share``), so the sum is the update's loss.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Balance(NamedTuple):
    coef: float       # router_aux_loss_coef
    num_experts: int
    top_k: int


def balance_of(model: torch.nn.Module) -> Balance | None:
    """The load-balancing settings of a MoE model whose config turns the loss on (``output_router_logits``)."""
    config = getattr(model, "config", None)
    if not getattr(config, "output_router_logits", False):
        return None
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    return Balance(float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0), int(experts),
                   int(config.num_experts_per_tok))


def router_sums(router_logits, attention_mask_BT: torch.Tensor, balance: Balance):
    """``(probs_E, counts_E, tokens)`` of one forward, as ``load_balancing_loss_func`` sums them: router
    probabilities (differentiable) and top-k assignments over the real tokens of every sparse layer, and the real
    tokens times the layers."""
    mask_N = attention_mask_BT.reshape(-1).float()
    probs_E = counts_E = 0.0
    for logits_NE in router_logits:
        probs_NE = torch.softmax(logits_NE, dim=-1)
        _, selected_NK = torch.topk(probs_NE, balance.top_k, dim=-1)
        counts_E = counts_E + torch.zeros(balance.num_experts, device=mask_N.device).scatter_add_(
            0, selected_NK.reshape(-1), mask_N.repeat_interleave(balance.top_k))
        probs_E = probs_E + (probs_NE.float() * mask_N[:, None]).sum(dim=0)
    return probs_E, counts_E, mask_N.sum() * len(router_logits)


def share(probs_E: torch.Tensor, counts_E: torch.Tensor, tokens: torch.Tensor, balance: Balance) -> torch.Tensor:
    """One micro-batch's share of the update's load-balancing loss: ``E * sum_e counts_e * probs_e / tokens^2`` with
    the update's ``counts_E`` and ``tokens``."""
    tokens = torch.clamp(tokens, min=1.0)
    return balance.num_experts * torch.sum(counts_E.detach() * probs_E) / (tokens * tokens)


def aux_share(router, balance: Balance, totals):
    """The last forward's share of the load-balancing loss (``router``: its router logits, attention mask and
    transformers' ``aux_loss``): transformers' own ``aux_loss`` when it is the update's only micro-batch (``totals``
    None), else its probabilities against the whole update's counts."""
    if totals is None:
        return router.aux_loss
    return share(router_sums(router.router_logits, router.attention_mask, balance)[0], *totals, balance)


def router_totals(router_of, micro_batches: list, balance: Balance):
    """The update's top-k assignments and real tokens x sparse layers (a first pass without gradients; ``router_of``
    runs one micro-batch's forward and returns its router outputs), or None for an update of one micro-batch (its
    forward counts its own)."""
    if len(micro_batches) == 1:
        return None
    counts_E = tokens = 0.0
    with torch.no_grad():
        for micro_batch in micro_batches:
            router = router_of(micro_batch)
            _, counts, n = router_sums(router.router_logits, router.attention_mask, balance)
            counts_E, tokens = counts_E + counts, tokens + n
    return counts_E, tokens
