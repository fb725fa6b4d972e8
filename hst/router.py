"""Routers: the HST KeyRouter (fixed keys, cosine top-k, growth gates and paths) and a learned Linear router.

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


class Gate(NamedTuple):
    """Growth gates, stacked along a leading gate axis G (or one gate without it).

    A gate's per-token score is ``features · w + v · gelu(u features + c) - shift`` — linear (the
    Fisher gate, hidden width h = 0) or a small MLP; it opens where the causal running mean of the
    score plus ``b`` is positive. Hidden units with zero weights add exactly 0, so gates of different
    widths stack by zero padding."""

    w: torch.Tensor  # (G, d) linear term
    u: torch.Tensor  # (G, h, d) hidden layer
    c: torch.Tensor  # (G, h) its bias
    v: torch.Tensor  # (G, h) output weights of the hidden units
    shift: torch.Tensor  # (G,) the held-in tokens' mean score: the running mean's prior pulls toward held-in
    b: torch.Tensor  # (G,) bias of the running mean: at most the gate's false-positive rate of held-in tokens pass

    @classmethod
    def linear(cls, w: torch.Tensor, shift: float, b: float) -> Gate:
        """One gate scoring ``features · w`` (no hidden units)."""
        return cls(w, w.new_zeros(0, len(w)), w.new_zeros(0), w.new_zeros(0), torch.tensor(float(shift)),
                   torch.tensor(float(b)))


def gate_scores(features: torch.Tensor, gate: Gate) -> torch.Tensor:
    """(B, T, d) features -> per-token scores: (B, T, G) for stacked gates, (B, T) for one gate
    (``gate.w`` of shape (d,))."""
    if gate.w.dim() == 1:
        return gate_scores(features, Gate(*(torch.as_tensor(t)[None] for t in gate)))[..., 0]
    f = features.float()
    scores = f @ gate.w.T
    if gate.u.shape[1]:
        G, h, d = gate.u.shape
        hidden = F.gelu(f @ gate.u.reshape(G * h, d).T + gate.c.reshape(-1))  # (B, T, G·h)
        scores = scores + (hidden.unflatten(-1, (G, h)) * gate.v).sum(-1)
    return scores - gate.shift


def gate_open(features: torch.Tensor, gate: Gate) -> torch.Tensor:
    """Where growth gates open on (B, T, d) features: (B, T, G) for stacked gates, (B, T) for one."""
    return scores_open(gate_scores(features, gate), gate.b)


def scores_open(scores: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Where gates with bias ``b`` open, given their per-token scores (B, T[, G]) (:func:`gate_scores`)."""
    return causal_mean(scores, GATE_PRIOR_TOKENS) + b > 0


def spherical_kmeans(x: torch.Tensor, k: int, iters: int = 10) -> torch.Tensor:
    """(k', d) unit centroids of the unit rows of ``x`` (N, d) by cosine k-means, k' = min(k, N);
    seeded from evenly spaced rows, so the result is deterministic. For k = 1: the normalized mean."""
    centroids = x[torch.linspace(0, len(x) - 1, min(k, len(x))).long()]
    for _ in range(iters if k > 1 else 1):
        assign = (x @ centroids.T).argmax(-1) if k > 1 else torch.zeros(len(x), dtype=torch.long)
        centroids = torch.stack([F.normalize(x[assign == j].mean(0), dim=-1) if (assign == j).any() else c
                                 for j, c in enumerate(centroids)])
    return centroids


class KeyRouter(nn.Module):
    """Routes by cosine similarity to per-expert keys held as a buffer (never a gradient target).

    Keys move only through :meth:`update_keys`, an EMA toward the normalized mean of the
    (normalized) hidden states routed to each expert.

    Experts added by growth sit behind a gate (:class:`Gate`, :func:`gate_open`): expert e is
    eligible for a token only where gate ``expert_gate[e]`` opens, i.e. where the causal running
    mean of the gate's score over the token's sequence so far, plus its bias, is positive. A single
    token is a weak domain signal (a byte); its context is a strong one, and the running mean uses
    no future tokens. Experts present from the start have no gate (``expert_gate = -1``) and are
    always eligible, so a token whose gates are closed routes exactly as before growth. The experts
    grown together in one layer share one gate.

    An expert can instead belong to a *path* (``expert_path[e] >= 1``, :mod:`hst.paths`): the experts a
    cycle grew, at every layer, on top of the experts present from the start (path 0). They are eligible
    exactly when the model runs that path (``path`` in :meth:`forward`) and nowhere else; on path 0
    every grown path's experts are out, so the base model computes what it did before any growth.
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, temperature: float,
                 momentum: float, centered: bool = False):
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(n_experts, d_model), dim=-1))
        # No gates until growth adds them; checkpoints bring their number and width (see load below).
        for name, shape in zip(Gate._fields, [(0, d_model), (0, 0, d_model), (0, 0), (0, 0), (0,), (0,)]):
            self.register_buffer(f"gate_{name}", torch.zeros(shape))
        self.register_buffer("expert_gate", torch.full((n_experts,), -1, dtype=torch.long))
        self.register_buffer("expert_path", torch.zeros(n_experts, dtype=torch.long))  # (E,) 0: on every path
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

    @property
    def gates(self) -> Gate:
        return Gate(*(getattr(self, f"gate_{name}") for name in Gate._fields))

    @property
    def n_paths(self) -> int:
        """Paths this router's experts belong to, the base path 0 included."""
        return 1 + int(self.expert_path.max())

    def eligible(self, f: torch.Tensor, path: int | torch.Tensor = 0) -> torch.Tensor:
        """(B, T, d) features -> (B, T, E) bool: which experts run for each token on ``path`` (one for all
        sequences, or (B,) one per sequence): path 0's and the path's own, where their gates are open."""
        path = torch.as_tensor(path, device=f.device).view(-1, 1, 1)  # (B or 1, 1, 1)
        on = ((self.expert_path == 0) | (self.expert_path == path)).expand(*f.shape[:-1], -1)  # (B, T, E)
        if not len(self.gate_b):
            return on
        always = torch.ones(*f.shape[:-1], 1, dtype=torch.bool, device=f.device)
        return on & torch.cat([always, gate_open(f, self.gates)], -1)[..., self.expert_gate + 1]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Growth adds gates: take their number and hidden width from the checkpoint being loaded.
        for name in Gate._fields:
            stored = state_dict.get(f"{prefix}gate_{name}")
            if stored is not None:
                setattr(self, f"gate_{name}", torch.zeros_like(stored, device=self.keys.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, path: int | torch.Tensor = 0) -> Routing:
        with torch.autocast(x.device.type, enabled=False):
            f = self.features(x if x.dim() == 3 else x[None])  # (B, T, d)
            sim = f.reshape(-1, f.shape[-1]) @ F.normalize(self.keys, dim=-1).T  # (B·T, E)
            sim = sim.masked_fill(~self.eligible(f, path).reshape(sim.shape), float("-inf"))
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

    def add_gate(self, gate: Gate) -> int:
        """Append one learned gate (fields without the gate axis); return its index for :meth:`add_key`."""
        width = max(self.gate_u.shape[1], gate.u.shape[0])
        for name, new in zip(Gate._fields, gate):
            old = getattr(self, f"gate_{name}")
            new = torch.as_tensor(new, dtype=old.dtype, device=old.device)[None]
            if name in ("u", "c", "v"):  # zero hidden units add nothing: pad both to the wider gate
                old, new = (F.pad(t, (0, 0) * (name == "u") + (0, width - t.shape[1])) for t in (old, new))
            setattr(self, f"gate_{name}", torch.cat([old, new]))
        return len(self.gate_b) - 1

    def add_key(self, key: torch.Tensor, gate: int | None = None, path: int = 0) -> None:
        """Append a key; with ``gate`` (an index from :meth:`add_gate`) its expert is eligible only
        where that gate opens, with ``path`` >= 1 only when the model runs that path."""
        self.keys = torch.cat([self.keys, F.normalize(key.float(), dim=-1)[None].to(self.keys)])
        self.expert_gate = torch.cat([self.expert_gate, self.expert_gate.new_tensor([-1 if gate is None else gate])])
        self.expert_path = torch.cat([self.expert_path, self.expert_path.new_tensor([path])])


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

    def forward(self, x: torch.Tensor, path: int | torch.Tensor = 0) -> Routing:
        """Route ``x``; every expert is path 0's (growth needs the key router), so ``path`` selects nothing."""
        with torch.autocast(x.device.type, enabled=False):
            probs = F.softmax(self.gate(x.reshape(-1, x.shape[-1]).float()), dim=-1)
        top_p, top_idx = probs.topk(self.n_experts if self.top_any else self.top_k, dim=-1)
        run = top_p >= self.floor
        run[:, 0] = True
        kept = top_p * run
        return Routing(top_idx.masked_fill(~run, SKIPPED), kept / kept.sum(-1, keepdim=True), top_p[:, 0], probs)
