"""Paths, and choosing one per sequence at flat inference cost.

A model grown with paths holds P of them: path 0 is the base experts alone, path p >= 1 adds growth
p's experts at every layer (:class:`hst.router.KeyRouter`'s ``expert_path``). Running one path costs one
model, whatever P is; running all P mixed by their posterior (:func:`mix_paths`,
``GPT.inference = "mixture"``) costs P models.

At flat cost (``GPT.inference = "select"``) a sequence runs one path per segment; by default
(``"select_base"``) path 0 runs beside it over every position and the two are mixed by their
posterior, so a misrouted segment falls back on the pretrained model; path 0 stops at a decision
position once its posterior weight is below :data:`PRUNE` (:func:`pruned`; :func:`relative_cost` with
``pruned_at``: at most one pass more, path 0's own segments free). A
path is chosen by its **sketch** (:mod:`hst.sketches`), a byte n-gram model of the records the path was
trained on. Path 0 holds one sketch per domain it learned and scores as the best of them, so a
pretraining domain is not judged by a sketch diluted with the others. A sequence's path at position t
is the one whose sketch gives bytes 0..t the highest likelihood — the Bayesian choice DEMix makes with
the paths themselves, made with models that cost a few table look-ups per byte.

The choice is made at fixed positions :data:`DECISIONS` of a sequence and then kept: positions before
the first decision run path 0, each later segment runs the path chosen from the bytes up to its first
position (no future byte decides). A path serving a segment computes every earlier position as its
context, so a sequence costs at most ``1 + sum(DECISIONS) / T`` models (1.53 at T = 256; 1.11 measured
on the default scenario, where a choice is mostly kept) — and the same at 5 paths or at 33.
"""

from __future__ import annotations

import torch

from hst.router import Routing
from hst.sketches import byte_logp, count, stack, unstack

# Positions at which a sequence (re)chooses its path; before the first, path 0 serves it. An early
# choice sees few bytes, later ones correct it (docs/decisions.md).
DECISIONS = (8, 32, 96)
# With the selection mixed with path 0 (``GPT.inference = "select_base"``), path 0 stops at a check
# position once its posterior weight is below this: the selected path explains the context by ~17 bits
# more. A stop is final, so a window that opens in the path's domain and turns (a Python docstring,
# then code) keeps the wrong member: 1e-3 (~10 bits) cost python +4.9 % when man pages' path grew in the
# stream scenario, 1e-5 nothing in that drop, at 3 % more passes; later consolidations still erode it
# (docs/decisions.md, "Pruning is final").
PRUNE = 1e-5
# ... and is checked every PRUNE_EVERY bytes besides the decision positions: it waits less for the
# next check, at the price of more, shorter calls (docs/decisions.md).
PRUNE_EVERY = 16


def by_path(scores: torch.Tensor, n_paths: int) -> torch.Tensor:
    """(..., K) scores of a model's K sketches -> (..., P) its paths': path 0 holds the first K - P + 1
    sketches (one per domain it learned) and scores as the best of them, each later path one."""
    first = scores.shape[-1] - n_paths + 1
    if first < 1:
        raise ValueError(f"a model of {n_paths} paths with {scores.shape[-1]} path sketches: run one path "
                         "(GPT.forward(..., path=p)) or mix them all (path=ALL_PATHS)")
    return torch.cat([scores[..., :first].amax(-1, keepdim=True), scores[..., first:]], -1)


def grown(table: torch.Tensor, n_paths: int) -> torch.Tensor:
    """The table of paths 1..P-1's sketches, in order (path 0's come first)."""
    return stack(unstack(table)[count(table) - n_paths + 1:])


def sketch_scores(idx: torch.Tensor, table: torch.Tensor, n_paths: int) -> torch.Tensor:
    """(B, T) bytes, a model's sketch table -> (B, T, P) each path's log-likelihood of bytes 0..t."""
    return by_path(byte_logp(idx, table).cumsum(1), n_paths)


def segments(T: int) -> list[tuple[int, int]]:
    """The ``(start, end)`` position ranges of a T-token sequence that keep one path: the first runs
    path 0, each later one the path chosen at its start."""
    bounds = [0, *(d for d in DECISIONS if d < T), T]
    return list(zip(bounds[:-1], bounds[1:]))


def checks(T: int) -> list[int]:
    """The positions of a T-token sequence at which path 0 beside the selection may stop."""
    return sorted({*DECISIONS, *range(PRUNE_EVERY, T, PRUNE_EVERY)} & set(range(1, T)))


def pieces(T: int) -> list[tuple[int, int, int]]:
    """:func:`segments` cut at :func:`checks`: ``(start, end, segment)`` ranges path 0 runs one at a time."""
    bounds = [0, *checks(T), T]
    return [(a, b, sum(d <= a for d in DECISIONS if d < T)) for a, b in zip(bounds[:-1], bounds[1:])]


def pruned(weight: torch.Tensor) -> torch.Tensor:
    """(B, T) path 0's posterior weight beside the selection given bytes 1..t -> (B,) where path 0 stops:
    the first check position (:func:`checks`) where the weight is below :data:`PRUNE` (T: never) — the
    rule ``hst.selection.select`` applies as it runs, replayed on members computed everywhere."""
    B, T = weight.shape
    stop = torch.full((B,), T, dtype=torch.long, device=weight.device)
    for d in reversed(checks(T)):
        stop[weight[:, d] < PRUNE] = d
    return stop


def segment_paths(scores: torch.Tensor) -> torch.Tensor:
    """(B, T, P) sketch scores -> (B, S) the path serving each of :func:`segments`' ranges."""
    starts = [start for start, _ in segments(scores.shape[1])]
    out = scores[:, starts].argmax(-1)
    out[:, 0] = 0
    return out


def runs(paths: torch.Tensor, T: int) -> dict[tuple[int, int], torch.Tensor]:
    """(B, S) segment paths -> ``{(path, length): rows}``: each path a sequence uses runs once, over
    the positions up to the end of the last segment it serves (the earlier ones are its context)."""
    ends = [end for _, end in segments(T)]
    out: dict[tuple[int, int], list[int]] = {}
    for b, row in enumerate(paths.tolist()):
        for p in set(row):
            out.setdefault((p, max(end for end, q in zip(ends, row) if q == p)), []).append(b)
    return {key: torch.tensor(rows) for key, rows in sorted(out.items())}


def relative_cost(paths: torch.Tensor, T: int, pruned_at: torch.Tensor | None = None) -> float:
    """Model passes per token that :func:`runs` spends on these (B, S) segment paths (1.0: one path).
    ``pruned_at``: with path 0 beside the selection (``select_base``), the (B,) position where path 0
    stops for each sequence (T: never, :func:`pruned`); it runs until then, or to the end of the last
    segment the selection gives it, and serves those segments itself."""
    spent = sum(length * len(rows) for (p, length), rows in runs(paths, T).items() if pruned_at is None or p != 0)
    if pruned_at is not None:
        ends = [end for _, end in segments(T)]
        spent += sum(max([int(stop)] + [end for end, p in zip(ends, row) if p == 0])
                     for stop, row in zip(pruned_at.tolist(), paths.tolist()))
    return spent / (paths.shape[0] * T)


def mix_paths(logits: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Bayesian mixture of P paths' next-token distributions for inputs ``idx`` (B, T), given
    their logits (P, B, T, V); returns its log-probabilities (B, T, V) and the paths' weights (P, B, T).

    At position t a path's weight is its prior (uniform) times the probability it gave the bytes seen
    so far, ``idx[:, 1..t]``: no future byte, no label and no stored text decide it. Over any sequence
    the mixture's total loss exceeds the best single path's by at most ln P nats (log2 P bits), so an
    old domain's path, unchanged by later growth, bounds what the mixture can forget on its text.
    """
    logp = logits.float().log_softmax(-1)
    P, B, T, _ = logp.shape
    seen = logp[:, :, :-1].gather(-1, idx[None, :, 1:, None].expand(P, B, T - 1, 1))[..., 0]  # (P, B, T-1)
    past = torch.cat([seen.new_zeros(P, B, 1), seen.cumsum(-1)], -1)  # (P, B, T) log-likelihood of the context
    weights = past.log_softmax(0)
    return (weights[..., None] + logp).logsumexp(0), weights.exp()


def most_weighted(routings: list[list[Routing | None]], best: torch.Tensor) -> list[Routing | None]:
    """Per layer, each token's routing from the run weighted most for it: ``routings`` one per run
    (fields flattened to B·T tokens), ``best`` (B, T) the run index per token."""
    best, token = best.reshape(-1), torch.arange(best.numel(), device=best.device)
    return [None if layer[0] is None else Routing(*(torch.stack(f)[best, token] for f in zip(*layer)))
            for layer in zip(*routings)]


class Stitched:
    """(B, T) positions' logits and per-layer routing, filled segment by segment from runs of paths."""

    def __init__(self, B: int, T: int):
        self.B, self.T = B, T
        self.logits: torch.Tensor | None = None
        self.fields: list[list[torch.Tensor] | None] | None = None

    def put(self, rows: torch.Tensor, start: int, end: int, out: torch.Tensor, routing: list[Routing | None],
            keep: torch.Tensor | None, offset: int = 0) -> None:
        """Positions start..end of ``rows`` from a run's (n, t, V) ``out`` and its routing (fields flattened
        to n·t), whose position 0 is ``offset``; ``keep``: which of the run's n rows ``rows`` are (all if None)."""
        if self.logits is None:  # zeros: a position no run filled stays finite (it is never read as a prediction)
            self.logits = out.new_zeros(self.B, self.T, out.shape[-1])
            self.fields = [None if layer is None else [f.new_zeros(self.B, self.T, *f.shape[1:]) for f in layer]
                           for layer in routing]
        n, t = out.shape[:2]
        pick = slice(None) if keep is None else keep
        self.logits[rows, start:end] = out[pick, start - offset:end - offset]
        for full, layer in zip(self.fields, routing):
            for f_full, f in zip(full or (), layer or ()):
                f_full[rows, start:end] = f.view(n, t, *f.shape[1:])[pick, start - offset:end - offset]

    def routing(self) -> list[Routing | None]:
        return [None if layer is None else Routing(*(f.flatten(0, 1) for f in layer)) for layer in self.fields]
