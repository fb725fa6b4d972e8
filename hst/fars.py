"""FARS (Fisher-aware routing shaping, seed 000): a routing tax from the optimizer's second moment,
and the seed's optional task-ID consistency loss.

Expert e's cost is a norm of ``sqrt(v)`` over its parameters, where ``v`` is AdamW's
``exp_avg_sq`` — our stand-in for the seed's ARS2-Neo second moment (both approximate the
diagonal Fisher information: large ``v`` means the expert's parameters are being pushed hard).
Costs are divided by their mean within the layer, so λ does not depend on the parameter count,
and are detached: only the routing is shaped, the cost is a measurement. The shaping loss is

    λ · Σ_layers Σ_e mean_tokens(belief_e) · cost_e

with ``belief`` the router's softmax (learned router) or the softmax over key similarities (key
router, where the gradient reaches the hidden states, not the fixed keys). Before the optimizer has
state for every expert of a layer, that layer contributes nothing.

The consistency loss (training only; inference stays feature-driven) is the mean over tokens of
``KL(belief_token ‖ mean belief of the token's domain in the batch)``, the domain mean detached: it
pulls each token's routing toward its domain's, raising the mutual information between domain and
expert without telling the router the domain at inference.
"""

from __future__ import annotations

import torch

from hst.config import FARS_NORMS
from hst.model import GPT
from hst.router import Routing


def expert_costs(model: GPT, opt: torch.optim.Optimizer, norm: str = "l2") -> list[torch.Tensor | None]:
    """Per MoE layer, the (E,) cost of each expert normalized to mean 1 (None: dense layer or no state)."""
    if norm not in FARS_NORMS:
        raise ValueError(f"fars norm: expected one of {FARS_NORMS}, got {norm!r}")
    costs = []
    for block in model.blocks:
        experts = getattr(block.ffn, "experts", None)
        if experts is None:
            costs.append(None)
            continue
        per_expert = []
        for expert in experts:
            states = [opt.state.get(p, {}).get("exp_avg_sq") for p in expert.parameters()]
            if any(s is None for s in states):
                break
            root = torch.cat([s.sqrt().flatten() for s in states])
            per_expert.append(root.norm() if norm == "l2" else root.mean())
        if len(per_expert) < len(experts):
            costs.append(None)
            continue
        cost = torch.stack(per_expert).detach()
        costs.append(cost / cost.mean().clamp_min(torch.finfo(cost.dtype).tiny))
    return costs


def fars_loss(routing: list[Routing | None], costs: list[torch.Tensor | None], lam: float) -> torch.Tensor:
    """``λ · Σ_layers Σ_e mean_tokens(belief_e) · cost_e``; zero where a layer has no cost yet."""
    terms = [(r.belief.mean(0) * c.to(r.belief)).sum() for r, c in zip(routing, costs)
             if r is not None and c is not None]
    if not terms:
        return torch.zeros(())
    return lam * torch.stack(terms).sum()


def consistency_loss(routing: list[Routing | None], domain: torch.Tensor, lam: float) -> torch.Tensor:
    """``λ · Σ_layers mean_tokens KL(belief ‖ its domain's mean belief)``.

    domain: (B,) domain index of each sequence; a layer's belief covers B·T tokens, sequence-major.
    """
    terms = []
    for r in routing:
        if r is None:
            continue
        p = r.belief.view(len(domain), -1, r.belief.shape[-1])  # (B, T, E)
        onehot = torch.nn.functional.one_hot(domain, int(domain.max()) + 1).to(p)  # (B, D)
        mean = torch.einsum("bd,bte->de", onehot, p.detach()) / (onehot.sum(0)[:, None] * p.shape[1]).clamp_min(1)
        target = mean[domain][:, None]  # (B, 1, E) each sequence's domain mean
        tiny = torch.finfo(p.dtype).tiny
        terms.append((p * (p.clamp_min(tiny).log() - target.clamp_min(tiny).log())).sum(-1).mean())
    if not terms:
        return torch.zeros(())
    return lam * torch.stack(terms).sum()
