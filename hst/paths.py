"""Paths, and choosing one per sequence at flat inference cost.

A model grown with paths holds P of them: path 0 is the base experts alone, path p >= 1 adds growth
p's experts at every layer (:class:`hst.router.KeyRouter`'s ``expert_path``). Running one path costs one
model, whatever P is; running all P mixed by their posterior (:func:`mix_paths`,
``GPT.inference = "mixture"``) costs P models.

At flat cost (``GPT.inference = "select"``) a sequence runs one path per segment; by default
(``"select_base"``) path 0 runs beside it over every position and the two are mixed by their
posterior, so a misrouted segment falls back on the pretrained model; path 0 stops at a decision
position once its posterior weight is below :data:`PRUNE` (:func:`relative_cost` with ``pruned_at``:
at most one pass more, path 0's own segments free). A
path is chosen by its **sketch**: a byte trigram model of the records the path was trained on (the
pretraining domains' for path 0), hashed to :data:`SKETCH_CONTEXTS` contexts, fitted when the path
is added from that path's records alone (no other path's text). A sequence's path at position t is
the one whose sketch gives bytes 0..t the highest likelihood — the Bayesian choice DEMix makes with
the paths themselves, made with models that cost a table look-up per byte.

The choice is made at fixed positions :data:`DECISIONS` of a sequence and then kept: positions before
the first decision run path 0, each later segment runs the path chosen from the bytes up to its first
position (no future byte decides). A path serving a segment computes every earlier position as its
context, so a sequence costs at most ``1 + sum(DECISIONS) / T`` models (1.53 at T = 256; 1.11 measured
on the default scenario, where a choice is mostly kept) — and the same at 5 paths or at 33.

The sketches also decide what a cycle does with its records (:func:`assign`): a record that a grown
path's sketch explains better than a sketch of the cycle's own records would (fitted on the other
half of them, so held out) belongs to that path, which consolidates on it; the records no path
explains grow a new path. A repeat of a known domain adds no path.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from hst.router import Routing

# Positions at which a sequence (re)chooses its path; before the first, path 0 serves it. An early
# choice sees few bytes, later ones correct it (docs/decisions.md).
DECISIONS = (8, 32, 96)
# With the selection mixed with path 0 (``GPT.inference = "select_base"``), path 0 stops at a decision
# position once its posterior weight is below this: the selected path explains the context by ~10 bits
# more, and path 0's pass is the cost (docs/decisions.md: 1e-4 to 1e-2 give the same BPB).
PRUNE = 1e-3
# Hashed trigram contexts of a sketch: (contexts, 256) log-probabilities, 1 MiB per path in fp32.
SKETCH_CONTEXTS = 1024
# Add-alpha smoothing of a sketch's counts.
SKETCH_ALPHA = 0.5


def _contexts(tokens: torch.Tensor) -> torch.Tensor:
    """(..., T) bytes -> (..., T - 2) the hashed context (two previous bytes) of each byte from the third."""
    t = tokens.long()
    return (t[..., :-2] * 257 + t[..., 1:-1]) % SKETCH_CONTEXTS


def fit_sketch(tokens: torch.Tensor, vocab_size: int = 256) -> torch.Tensor:
    """(N,) a path's training bytes -> (SKETCH_CONTEXTS, vocab_size) log-probabilities of the next byte."""
    counts = torch.zeros(SKETCH_CONTEXTS, vocab_size)
    counts.index_put_((_contexts(tokens), tokens[2:].long()), torch.ones(len(tokens) - 2), accumulate=True)
    return ((counts + SKETCH_ALPHA) / (counts.sum(1, keepdim=True) + vocab_size * SKETCH_ALPHA)).log()


def record_bits(sketch: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(P, C, V) sketches, (N,) one record's bytes -> (P,) bits per byte each sketch spends on its bytes from the third."""
    if len(tokens) < 3:
        return sketch.new_zeros(len(sketch))
    return -sketch[:, _contexts(tokens), tokens[2:].long()].mean(1) / math.log(2)


class Assignment(NamedTuple):
    """Which grown path explains each record of a drop (:func:`assign`)."""
    path: list[int]  # per record: the grown path (>= 1) that explains it, or NOVEL
    gap: list[float]  # per record: bits per byte the best grown path's sketch spends beyond the drop's own (held out)
    best: list[int]  # per record: the grown path whose sketch explains it best (NOVEL without grown paths)


# A record no grown path explains.
NOVEL = -1


def assign(sketches: torch.Tensor, records: list[torch.Tensor]) -> Assignment:
    """Per record of a drop, the grown path (1..P-1; path 0 is the trunk every path builds on and is
    never trained again) whose sketch explains its bytes at least as well as a sketch of the drop
    itself, fitted on the other half of its records (even and odd ones) — a held-out stand-in for the
    sketch a new path grown on this drop would have. Such a record is known: that path consolidates
    on it. A record that no grown path explains that well is NOVEL.

    The comparison needs no threshold: on the shipped corpus a path's own domain scores 0.10 to 0.36
    bits per byte below the drop's own sketch and every other domain 0.09 to 4.9 above it
    (docs/decisions.md, "Novelty decides grow or consolidate")."""
    if len(sketches) < 2 or len(records) < 2:  # no grown path, or no held-out half to compare with
        return Assignment([NOVEL] * len(records), [math.inf] * len(records), [NOVEL] * len(records))
    halves = [torch.cat(records[i::2]) for i in (0, 1)]
    sizes = sketch_bytes(sketches)
    own: dict[tuple[int, int], torch.Tensor] = {}  # (half, bytes) -> sketch, fitted once
    out = Assignment([], [], [])
    for i, tokens in enumerate(records):
        bits = record_bits(sketches[1:], tokens)  # (P - 1,)
        best = int(bits.argmin())
        # At most as many bytes as the path's sketch saw: more data alone makes a sketch better, and a
        # large repeat of a domain must not look novel for it.
        key = (1 - i % 2, min(len(halves[1 - i % 2]), int(sizes[best + 1])))
        if key not in own:
            own[key] = fit_sketch(halves[key[0]][:key[1]], sketches.shape[-1])
        gap = float(bits[best] - record_bits(own[key][None], tokens)[0])
        out.path.append(best + 1 if gap <= 0 else NOVEL)
        out.gap.append(gap)
        out.best.append(best + 1)
    return out


def sketch_bytes(sketches: torch.Tensor) -> torch.Tensor:
    """(P, C, V) sketches -> (P,) about how many bytes each was fitted on, read back from its smoothing:
    a context seen n times gives an unseen byte SKETCH_ALPHA / (n + V * SKETCH_ALPHA) (a context in which
    every byte was seen counts low)."""
    V = sketches.shape[-1]
    n = SKETCH_ALPHA / sketches.min(-1).values.exp() - V * SKETCH_ALPHA  # (P, C): a context's count
    return n.clamp_min(0).sum(-1).round()


def sketch_scores(idx: torch.Tensor, sketches: torch.Tensor) -> torch.Tensor:
    """(B, T) bytes, (P, C, V) sketches -> (B, T, P): each path's log-likelihood of bytes 0..t."""
    B, T = idx.shape
    scores = sketches.new_zeros(B, T, len(sketches))
    if T > 2:
        ctx, nxt = _contexts(idx), idx[:, 2:].long()
        scores[:, 2:] = sketches[:, ctx, nxt].permute(1, 2, 0)  # (P, B, T-2) -> (B, T-2, P)
    return scores.cumsum(1)


def segments(T: int) -> list[tuple[int, int]]:
    """The ``(start, end)`` position ranges of a T-token sequence that keep one path: the first runs
    path 0, each later one the path chosen at its start."""
    bounds = [0, *(d for d in DECISIONS if d < T), T]
    return list(zip(bounds[:-1], bounds[1:]))


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
    stops for each sequence (T: never); it runs until then, or to the end of the last segment the
    selection gives it, and serves those segments itself."""
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
