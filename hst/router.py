"""Routers: the HST KeyRouter (fixed keys, cosine top-k, novelty flag) and a learned Linear router.

Both map FFN inputs ``x`` of shape (N, d) to a :class:`Routing`. Routing is computed in fp32
even under autocast, so that routing decisions (and routing-stability metrics) do not depend on
the training precision.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class Routing(NamedTuple):
    """Per-token routing of one layer (N tokens, k experts per token, E experts)."""

    expert_ids: torch.Tensor  # (N, k) int64, best first
    weights: torch.Tensor  # (N, k) mixing weights, sum to 1 per token
    max_sim: torch.Tensor  # (N,) best key cosine similarity (key router) or best probability (learned)
    needs_new: torch.Tensor  # (N,) bool: no existing expert matches this token well enough
    belief: torch.Tensor  # (N, E) the router's distribution over all experts


class KeyRouter(nn.Module):
    """Routes by cosine similarity to per-expert keys held as a buffer (never a gradient target).

    Keys move only through :meth:`update_keys`, an EMA toward the normalized mean of the
    (normalized) hidden states routed to each expert.
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, temperature: float,
                 novelty_threshold: float, momentum: float, centered: bool = False):
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(n_experts, d_model), dim=-1))
        # Running mean of the routed hidden states; subtracted before the cosine when ``centered``,
        # because all hidden states share a large common direction (anisotropy).
        self.register_buffer("center", torch.zeros(d_model))
        self.centered = centered
        self.top_k = top_k
        self.temperature = temperature
        self.novelty_threshold = novelty_threshold
        self.momentum = momentum

    @property
    def n_experts(self) -> int:
        return self.keys.shape[0]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The normalized (and, if ``centered``, centred) fp32 hidden states keys are compared with."""
        x = x.float()
        return F.normalize(x - self.center if self.centered else x, dim=-1)

    def similarity(self, x: torch.Tensor) -> torch.Tensor:
        """(N, d) -> (N, E) cosine similarity to every key, in fp32."""
        with torch.autocast(x.device.type, enabled=False):
            return self.features(x) @ F.normalize(self.keys, dim=-1).T

    def forward(self, x: torch.Tensor) -> Routing:
        sim = self.similarity(x)
        top_sim, top_idx = sim.topk(self.top_k, dim=-1)
        weights = F.softmax(top_sim / self.temperature, dim=-1)
        max_sim = top_sim[:, 0]
        belief = F.softmax(sim / self.temperature, dim=-1)
        return Routing(top_idx, weights, max_sim, max_sim < self.novelty_threshold, belief)

    @torch.no_grad()
    def update_keys(self, x: torch.Tensor, expert_ids: torch.Tensor) -> None:
        """EMA every key that received tokens toward the normalized mean of those tokens.

        x: (N, d) hidden states that were routed; expert_ids: (N, k) their experts.
        """
        xn = self.features(x.detach())
        member = xn.new_zeros(len(xn), self.n_experts).scatter_(1, expert_ids, 1.0)  # (N, E)
        hit = member.sum(0) > 0
        target = F.normalize((member.T @ xn)[hit], dim=-1)  # normalized mean of each expert's tokens
        self.keys[hit] = F.normalize(self.momentum * self.keys[hit] + (1 - self.momentum) * target, dim=-1)

    @torch.no_grad()
    def update_center(self, x: torch.Tensor) -> None:
        """EMA the centre toward the mean hidden state (only used when ``centered``)."""
        if self.centered:
            self.center.lerp_(x.detach().float().mean(0), 1 - self.momentum)

    def add_key(self, key: torch.Tensor) -> None:
        self.keys = torch.cat([self.keys, F.normalize(key.float(), dim=-1)[None].to(self.keys)])


class LearnedRouter(nn.Module):
    """Standard MoE gate: ``Linear(d, E)``, softmax, top-k, weights renormalised over the top-k."""

    def __init__(self, d_model: int, n_experts: int, top_k: int):
        super().__init__()
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        self.top_k = top_k

    @property
    def n_experts(self) -> int:
        return self.gate.out_features

    def forward(self, x: torch.Tensor) -> Routing:
        with torch.autocast(x.device.type, enabled=False):
            probs = F.softmax(self.gate(x.float()), dim=-1)
        top_p, top_idx = probs.topk(self.top_k, dim=-1)
        weights = top_p / top_p.sum(-1, keepdim=True)
        max_p = top_p[:, 0]
        return Routing(top_idx, weights, max_p, torch.zeros_like(max_p, dtype=torch.bool), probs)
