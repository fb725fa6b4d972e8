"""ReLU² experts, the growable MoE layer and its token dispatch.

Dispatch groups the N·k (token, expert) assignments by expert with one stable sort, runs each
selected expert once on its contiguous slice, and scatter-adds the weighted outputs back. Only
experts that received tokens run; the Python loop is over experts, never over tokens. Experts are
separate modules (not slices of one stacked tensor) so that one expert can be frozen, trained or
copied on its own and the pool can grow.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from hst import sparse
from hst.config import ModelConfig
from hst.router import SKIPPED, KeyRouter, LearnedRouter, Routing


class Expert(nn.Module):
    """``down(relu(up(x))²)``; below density 1 ``up`` and ``down`` are masked (:mod:`hst.sparse`)."""

    def __init__(self, d_model: int, hidden: int, density: float = 1.0):
        super().__init__()
        self.density = density
        self.up = sparse.linear(d_model, hidden, density)
        self.down = sparse.linear(hidden, d_model, density)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.relu(self.up(x)).square())

    @torch.no_grad()
    def reset_parameters(self, std: float, n_layer: int) -> None:
        """Normal init; the residual-facing ``down`` is scaled by 1/sqrt(2·n_layer) (GPT-2).

        A unit of a sparse layer sums ``density`` times as many inputs, so the std grows by
        1/sqrt(density) to keep the variance of its pre-activation as in the dense expert.
        """
        std = std / self.density ** 0.5
        nn.init.normal_(self.up.weight, std=std)
        nn.init.normal_(self.down.weight, std=std / (2 * n_layer) ** 0.5)
        for lin in (self.up, self.down):
            if isinstance(lin, sparse.SparseLinear):
                lin.zero_dead()


def dispatch(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
             experts: nn.ModuleList) -> torch.Tensor:
    """Σ_j weights[n, j] · experts[expert_ids[n, j]](x[n]) for every token n; SKIPPED slots run nothing.

    x: (N, d); expert_ids, weights: (N, k).
    """
    n_tokens, k = expert_ids.shape
    flat = expert_ids.reshape(-1)  # (N·k,) assignment a belongs to token a // k
    order = flat.argsort(stable=True)
    order = order[int((flat == SKIPPED).sum()):]  # SKIPPED (-1) sorts first
    token = order // k  # token of each assignment that runs, grouped by expert
    counts = torch.bincount(flat[order], minlength=len(experts)).tolist()
    chunks = x.index_select(0, token).split(counts)
    ys = torch.cat([experts[e](c) for e, c in enumerate(chunks) if counts[e] > 0])
    ys = ys * weights.reshape(-1)[order, None].to(ys.dtype)
    return ys.new_zeros(n_tokens, x.shape[1]).index_add_(0, token, ys)


def reference_dispatch(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                       experts: nn.ModuleList) -> torch.Tensor:
    """The obvious masked loop (HF-Mixtral style): the yardstick for tests and the benchmark."""
    out = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        tok, slot = torch.where(expert_ids == e)
        if tok.numel():
            out[tok] += weights[tok, slot, None] * expert(x[tok])
    return out


class MoE(nn.Module):
    """Router + expert pool. ``forward`` returns ``(output, routing)``."""

    def __init__(self, cfg: ModelConfig, n_experts: int):
        super().__init__()
        self.cfg = cfg
        if cfg.ffn == "key":
            self.router = KeyRouter(cfg.d_model, n_experts, cfg.top_k, cfg.router_temperature,
                                    cfg.key_momentum, cfg.center_routing)
        else:
            self.router = LearnedRouter(cfg.d_model, n_experts, cfg.top_k, cfg.routing == "top_any",
                                        cfg.router_floor)
        self.experts = nn.ModuleList(Expert(cfg.d_model, cfg.expert_hidden, cfg.expert_density)
                                     for _ in range(n_experts))

    def forward(self, x: torch.Tensor, update_keys: bool = False,
                path: int | torch.Tensor = 0) -> tuple[torch.Tensor, Routing]:
        shape = x.shape
        routing = self.router(x, path)
        x = x.reshape(-1, shape[-1])  # (B·T, d)
        if update_keys and isinstance(self.router, KeyRouter):
            self.router.update_keys(x, routing.expert_ids)
            self.router.update_center(x)
        out = dispatch(x, routing.expert_ids, routing.weights, self.experts)
        return out.reshape(shape), routing

    @torch.no_grad()
    def add_expert(self, key: torch.Tensor, init: str = "copy_nearest",
                   gate: int | None = None, path: int = 0) -> int:
        """Append an expert with ``key`` (behind the router's growth gate number ``gate``, or on
        ``path`` >= 1, see :class:`KeyRouter`); return its index.

        ``copy_nearest`` copies the weights of the expert whose key is most similar to ``key`` (on a
        path: of path 0's experts, the ones the path runs beside); ``random`` draws fresh
        weights. Tokens whose top-k does not include the new expert — in particular every token whose
        gate is closed — keep exactly their previous routing, weights and output.
        """
        if not isinstance(self.router, KeyRouter):
            raise ValueError("add_expert needs the key router (model.ffn: key)")
        if init == "copy_nearest":
            sim = self.router.similarity(key[None])[0]
            if path:
                sim = sim.masked_fill(self.router.expert_path > 0, float("-inf"))
            nearest = int(sim.argmax())
            expert = copy.deepcopy(self.experts[nearest])
        elif init == "random":
            expert = Expert(self.cfg.d_model, self.cfg.expert_hidden, self.cfg.expert_density).to(key.device)
            expert.reset_parameters(self.cfg.init_std, self.cfg.n_layer)
        else:
            raise ValueError(f"add_expert: init must be 'copy_nearest' or 'random', got {init!r}")
        self.router.add_key(key, gate, path)
        self.experts.append(expert)
        return len(self.experts) - 1
