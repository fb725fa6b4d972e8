"""Routers: the HST KeyRouter (fixed keys, cosine top-k, growth gates) and a learned Linear router.

Both map FFN inputs ``x`` of shape (B, T, d) — or (T, d), one sequence — to a :class:`Routing`
over the B·T tokens. Routing is computed in fp32 even under autocast, so that routing decisions
(and routing-stability metrics) do not depend on the training precision.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from hst import distributed


# Expert id of a routing slot that runs no expert (a Top-Any slot below the router's weight floor).
SKIPPED = -1


class Routing(NamedTuple):
    """Per-token routing of one layer (N tokens, k slots per token, E experts)."""

    expert_ids: torch.Tensor  # (N, k) int64, best first; SKIPPED where a slot runs no expert
    weights: torch.Tensor  # (N, k) mixing weights, sum to 1 per token (0 on skipped slots)
    max_sim: torch.Tensor  # (N,) best key cosine similarity (key router) or best probability (learned)
    belief: torch.Tensor  # (N, E) the router's distribution over all experts


# Pseudo-tokens at the held-in mean that open every growth gate's running mean: the first bytes of
# a sequence say little, and without them most held-in false positives were early positions
# (measured, German gates at 0.3 % held-in pass rate: 6–58 % of German tokens pass with 0,
# 70–84 % with 4; docs/decisions.md).
GATE_PRIOR_TOKENS = 4


def causal_mean(s: torch.Tensor, prior: float = 0.0) -> torch.Tensor:
    """Running mean along the sequence axis 1: token t averages positions 0..t of its sequence,
    plus ``prior`` pseudo-observations of 0."""
    steps = torch.arange(1, s.shape[1] + 1, device=s.device, dtype=s.dtype) + prior
    return s.cumsum(1) / steps.view(1, -1, *([1] * (s.dim() - 2)))


def gate_open(features: torch.Tensor, w: torch.Tensor, shift: torch.Tensor | float,
              b: torch.Tensor | float) -> torch.Tensor:
    """Growth gates on (B, T, d) features: open where the causal running mean of
    ``features @ w - shift`` (``shift``: the held-in mean score, so the prior pulls toward held-in)
    plus ``b`` is positive. ``w``: (d, G) with ``shift``, ``b``: (G,) give (B, T, G); ``w``: (d,)
    gives (B, T)."""
    return causal_mean(features @ w.to(features.dtype) - shift, GATE_PRIOR_TOKENS) + b > 0


class KeyRouter(nn.Module):
    """Routes by cosine similarity to per-expert keys held as a buffer (never a gradient target).

    Keys move only through :meth:`update_keys`, an EMA toward the normalized mean of the
    (normalized) hidden states routed to each expert.

    Experts added by growth carry a gate (:func:`gate_open`): expert e is eligible for a token only
    when the causal running mean of ``features · gate_w[e] - gate_shift[e]`` over the token's
    sequence so far, plus ``gate_b[e]``, is positive. A single token is a weak domain signal (a
    byte); its context is a strong one, and the running mean uses no future tokens. Experts present
    from the start are always eligible (``gate_w = 0, gate_shift = 0, gate_b = 1``), so a token whose
    gates are closed routes exactly as before growth.
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, temperature: float,
                 momentum: float, centered: bool = False):
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(n_experts, d_model), dim=-1))
        self.register_buffer("gate_w", torch.zeros(n_experts, d_model))
        self.register_buffer("gate_shift", torch.zeros(n_experts))
        self.register_buffer("gate_b", torch.ones(n_experts))
        # Running mean of the routed hidden states; subtracted before the cosine when ``centered``,
        # because all hidden states share a large common direction (anisotropy).
        self.register_buffer("center", torch.zeros(d_model))
        self.centered = centered
        self.top_k = top_k
        self.temperature = temperature
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

    def eligible(self, f: torch.Tensor) -> torch.Tensor:
        """(B, T, d) features -> (B, T, E) bool: which experts' gates are open for each token."""
        return gate_open(f, self.gate_w.T, self.gate_shift, self.gate_b)

    def forward(self, x: torch.Tensor) -> Routing:
        with torch.autocast(x.device.type, enabled=False):
            f = self.features(x if x.dim() == 3 else x[None])  # (B, T, d)
            sim = f.reshape(-1, f.shape[-1]) @ F.normalize(self.keys, dim=-1).T  # (B·T, E)
            sim = sim.masked_fill(~self.eligible(f).reshape(sim.shape), float("-inf"))
        top_sim, top_idx = sim.topk(self.top_k, dim=-1)
        weights = F.softmax(top_sim / self.temperature, dim=-1)
        belief = F.softmax(sim / self.temperature, dim=-1)
        return Routing(top_idx, weights, top_sim[:, 0], belief)

    @torch.no_grad()
    def update_keys(self, x: torch.Tensor, expert_ids: torch.Tensor) -> None:
        """EMA every key that received tokens toward the normalized mean of those tokens.

        x: (N, d) hidden states that were routed; expert_ids: (N, k) their experts.
        """
        xn = self.features(x.detach())
        member = xn.new_zeros(len(xn), self.n_experts).scatter_(1, expert_ids, 1.0)  # (N, E)
        total, count = member.T @ xn, member.sum(0)  # (E, d), (E,)
        distributed.all_reduce_(total, count)  # every rank's tokens: the keys stay equal across ranks
        hit = count > 0
        target = F.normalize(total[hit], dim=-1)  # normalized mean of each expert's tokens
        self.keys[hit] = F.normalize(self.momentum * self.keys[hit] + (1 - self.momentum) * target, dim=-1)

    @torch.no_grad()
    def update_center(self, x: torch.Tensor) -> None:
        """EMA the centre toward the mean hidden state (only used when ``centered``)."""
        if self.centered:
            mean = x.detach().float().mean(0)
            distributed.all_reduce_(mean, mean=True)  # ranks hold equally many tokens
            self.center.lerp_(mean, 1 - self.momentum)

    def add_key(self, key: torch.Tensor, gate: tuple[torch.Tensor, float, float] | None = None) -> None:
        """Append a key; ``gate = (w, shift, b)`` makes the new expert eligible only where it opens."""
        w, shift, b = gate if gate is not None else (torch.zeros_like(self.keys[0]), 0.0, 1.0)
        self.keys = torch.cat([self.keys, F.normalize(key.float(), dim=-1)[None].to(self.keys)])
        self.gate_w = torch.cat([self.gate_w, w.float()[None].to(self.gate_w)])
        self.gate_shift = torch.cat([self.gate_shift, self.gate_shift.new_tensor([shift])])
        self.gate_b = torch.cat([self.gate_b, self.gate_b.new_tensor([b])])


class LearnedRouter(nn.Module):
    """Standard MoE gate: ``Linear(d, E)``, softmax, then top-k — or Top-Any (seed 000): every
    expert, weighted by the softmax.

    Slots whose probability is below ``floor`` are skipped (:data:`SKIPPED`, weight 0), so with
    Top-Any the experts run per token fall as routing sharpens; a token always keeps its best
    expert. Weights are renormalised over the slots that run.
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, top_any: bool = False, floor: float = 0.0):
        super().__init__()
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        self.top_k = top_k
        self.top_any = top_any
        self.floor = floor

    @property
    def n_experts(self) -> int:
        return self.gate.out_features

    def forward(self, x: torch.Tensor) -> Routing:
        with torch.autocast(x.device.type, enabled=False):
            probs = F.softmax(self.gate(x.reshape(-1, x.shape[-1]).float()), dim=-1)
        top_p, top_idx = probs.topk(self.n_experts if self.top_any else self.top_k, dim=-1)
        run = top_p >= self.floor
        run[:, 0] = True
        kept = top_p * run
        return Routing(top_idx.masked_fill(~run, SKIPPED), kept / kept.sum(-1, keepdim=True), top_p[:, 0], probs)
