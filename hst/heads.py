"""Output heads of grown paths: a path's own capacity is its experts and, with ``grow.head: path``, an
output head of its own; the trunk (embedding, attention, path 0's experts) stays shared.

Path 0's head is the model's ``lm_head``; a grown path without a head of its own reads it. A head is
``vocab × d`` weights (65 k in the default) and costs no FLOPs beyond the one it replaces. Measured on
a German path grown from the man-pages champion: training the head with the new experts took German
on that path from 3.058 to 2.896 BPB, of 2.825 with every weight trainable (``docs/decisions.md``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PathHeads(nn.ParameterDict):
    """Heads of the grown paths that have their own, keyed by path number ("3": path 3's). Empty, and
    without state-dict keys, until one is added: a model without them stores what it did before."""

    def own(self, path: int) -> list[nn.Parameter]:
        """``path``'s own head, if it has one (what trains with the path's experts as the path grows), else nothing."""
        return [self[str(path)]] if str(path) in self else []

    def weight(self, path: int, base: torch.Tensor) -> torch.Tensor:
        """(vocab, d) the head ``path`` reads: its own, else ``base`` (path 0's)."""
        return next(iter(self.own(path)), base)

    def add(self, path: int, base: torch.Tensor) -> nn.Parameter:
        """Give ``path`` a head of its own, starting as a copy of ``base`` (path 0's): the path computes
        what it did until the head trains."""
        if str(path) in self:
            raise ValueError(f"path {path} already has a head of its own")
        self[str(path)] = nn.Parameter(base.detach().clone())
        return self[str(path)]

    def logits(self, x: torch.Tensor, path: int | torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (B, T, vocab) float logits through ``path``'s head (one path for all sequences,
        or (B,) one per sequence)."""
        if isinstance(path, torch.Tensor) and path.dim():
            heads = {p: self.weight(p, base) for p in path.unique().tolist()}
            if len({id(w) for w in heads.values()}) > 1:  # rows on different heads: one product per head
                out = x.new_empty(*x.shape[:-1], len(base))
                for p, w in heads.items():
                    rows = path == p
                    out[rows] = F.linear(x[rows], w)
                return out.float()
            path = next(iter(heads))
        return F.linear(x, self.weight(int(path), base)).float()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The heads a checkpoint holds come with it: make room for each before loading.
        for key, value in state_dict.items():
            name = key[len(prefix):]
            if key.startswith(prefix) and name.isdigit() and name not in self and isinstance(value, torch.Tensor):
                self[name] = nn.Parameter(torch.empty_like(value))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
