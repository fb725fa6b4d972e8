"""Sparse expert internals (seed §4): fixed-count connectivity masks and prune-and-regrow.

A :class:`SparseLinear` is a bias-free ``nn.Linear`` whose weight is multiplied by a boolean
``mask`` buffer in the forward pass, so a dead connection contributes nothing and its gradient
is exactly zero. Stored weights at dead positions are kept at zero as well (at init and at every
topology change), so AdamW never moves them: the moments of a zero-gradient position stay zero and
decoupled weight decay multiplies zero. The mask is a buffer, so checkpoints carry it.

Topology evolution (seed §4.3, RigL-style): every ``ΔT`` steps, each sparse layer that received
gradient in the window drops its live connections with the lowest importance ``|w| · |g|`` and
grows the same number at dead positions, scored by ``|g|`` (``gradient``) or by the number of
length-3 paths between the two units (``common_neighbors``, the bipartite form of the
common-neighbour link-prediction score). ``g`` is the dense gradient of the masked weight summed
over the window. New connections start at zero with zeroed optimizer state; the live count of a
layer never changes.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from hst.config import REGROW_CRITERIA


def live_count(numel: int, density: float) -> int:
    """Live connections of a ``numel``-weight matrix at ``density`` (at least one)."""
    return max(1, round(density * numel))


def random_mask(shape: tuple[int, int], density: float) -> torch.Tensor:
    """Boolean mask with exactly ``live_count`` True entries at uniformly random positions."""
    numel = shape[0] * shape[1]
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel)[:live_count(numel, density)]] = True
    return mask.view(shape)


class SparseLinear(nn.Linear):
    """``x @ (weight * mask).T`` with a fixed number of live connections."""

    def __init__(self, in_features: int, out_features: int, density: float):
        super().__init__(in_features, out_features, bias=False)
        self.register_buffer("mask", random_mask((out_features, in_features), density))
        # While a training run evolves the topology: the dense gradient of the masked weight, summed
        # over the current window, and whether any gradient arrived. None when not tracked.
        self.window_grad: torch.Tensor | None = None
        self.active = False
        self.zero_dead()

    @torch.no_grad()
    def zero_dead(self) -> None:
        """Write exact zeros at the dead positions of the stored weight."""
        self.weight.mul_(self.mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight * self.mask
        if self.window_grad is not None and w.requires_grad:
            w.register_hook(self._accumulate)
        return F.linear(x, w)

    def _accumulate(self, grad: torch.Tensor) -> None:
        self.window_grad.add_(grad)
        self.active = True


def linear(in_features: int, out_features: int, density: float) -> nn.Linear:
    """A plain ``nn.Linear`` at density 1 (the dense expert, unchanged), else a :class:`SparseLinear`."""
    if density >= 1.0:
        return nn.Linear(in_features, out_features, bias=False)
    return SparseLinear(in_features, out_features, density)


def path_counts(mask: torch.Tensor) -> torch.Tensor:
    """(out, in) number of length-3 paths ``o – i' – o' – i`` between every output and input unit.

    In a bipartite layer an output and an input unit never share a neighbour, so the
    common-neighbour score becomes: how many of ``o``'s inputs feed an output that ``i`` also feeds.
    """
    m = mask.float()
    return m @ (m.T @ m)  # (out, in) @ (in, in)


@torch.no_grad()
def prune_and_regrow(layer: SparseLinear, fraction: float, regrow: str, optimizer_state: dict,
                     gen: torch.Generator) -> int:
    """Move ``fraction`` of ``layer``'s live connections; return how many moved.

    Uses ``layer.window_grad``. Dropped and grown positions get weight 0 and zeroed optimizer state
    (every state tensor shaped like the weight), so a dropped connection cannot drift back and a
    grown one starts from nothing. Grown positions are drawn from those dead before the update.
    """
    mask, w, g = layer.mask.view(-1), layer.weight.view(-1), layer.window_grad.view(-1)
    live, dead = mask.nonzero().squeeze(1), (~mask).nonzero().squeeze(1)
    n = min(int(fraction * len(live)), len(dead))
    if n == 0:
        return 0
    drop = live[(w[live].abs() * g[live].abs()).topk(n, largest=False).indices]
    if regrow == "gradient":
        score = g[dead].abs()
    elif regrow == "common_neighbors":
        # Path counts are integers; uniform noise in [0, 1) only breaks their many ties (CPU
        # generator, so the draw is the same on every device).
        score = path_counts(layer.mask).view(-1)[dead] + torch.rand(len(dead), generator=gen).to(dead.device)
    else:
        raise ValueError(f"regrow: expected one of {REGROW_CRITERIA}, got {regrow!r}")
    grow = dead[score.topk(n).indices]
    mask[drop], mask[grow] = False, True
    changed = torch.cat([drop, grow])
    w[changed] = 0.0
    for value in optimizer_state.values():
        if torch.is_tensor(value) and value.shape == layer.weight.shape:
            value.view(-1)[changed] = 0.0
    return n


class Topology:
    """Prune-and-regrow for the trainable sparse layers of a model during one training run.

    Call :meth:`after_step` after every optimizer step. Only layers whose weight requires grad
    are tracked, so a run that trains one expert (consolidation) evolves that expert alone.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, every: int, fraction: float,
                 regrow: str, total_steps: int, seed: int = 0):
        self.layers = [m for m in model.modules()
                       if isinstance(m, SparseLinear) and m.weight.requires_grad] if every > 0 else []
        self.optimizer = optimizer
        self.every, self.fraction, self.regrow, self.total_steps = every, fraction, regrow, total_steps
        self.gen = torch.Generator().manual_seed(seed)
        self.updates = 0  # layer updates that moved connections
        self.moved = 0  # connections moved in all updates
        for layer in self.layers:
            layer.window_grad = torch.zeros_like(layer.weight)
            layer.active = False

    def after_step(self, step: int) -> None:
        """``step``: optimizer steps done. Evolves at multiples of ``every``, never after the last."""
        if not self.layers or step % self.every or step >= self.total_steps:
            return
        for layer in self.layers:
            if layer.active:
                n = prune_and_regrow(layer, self.fraction, self.regrow,
                                     self.optimizer.state.get(layer.weight, {}), self.gen)
                self.updates += n > 0
                self.moved += n
            layer.window_grad.zero_()
            layer.active = False

    def close(self) -> None:
        for layer in self.layers:
            layer.window_grad = None
            layer.active = False

    def summary(self) -> dict:
        return {"layers": len(self.layers), "updates": self.updates, "moved": self.moved}


@contextmanager
def evolving(model: nn.Module, optimizer: torch.optim.Optimizer, every: int, fraction: float,
             regrow: str, total_steps: int, seed: int = 0):
    """A :class:`Topology` for the duration of a training run; gradient tracking stops on exit."""
    topology = Topology(model, optimizer, every, fraction, regrow, total_steps, seed)
    try:
        yield topology
    finally:
        topology.close()
