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
path is chosen by its **sketch**: a byte n-gram model (contexts of up to :data:`SKETCH_ORDER`
bytes, Witten-Bell interpolated, exact counts) of the records the path
was trained on, fitted when the path is added from that path's records alone (no other path's text).
Path 0 holds one sketch per domain it learned and scores as the best of them, so a pretraining domain
is not judged by a sketch diluted with the others. A sequence's path at position t is the one whose
sketch gives bytes 0..t the highest likelihood — the Bayesian choice DEMix makes with the paths
themselves, made with models that cost a few table look-ups per byte.

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
import torch.nn.functional as F

from hst.router import Routing

# Positions at which a sequence (re)chooses its path; before the first, path 0 serves it. An early
# choice sees few bytes, later ones correct it (docs/decisions.md).
DECISIONS = (8, 32, 96)
# With the selection mixed with path 0 (``GPT.inference = "select_base"``), path 0 stops at a decision
# position once its posterior weight is below this: the selected path explains the context by ~10 bits
# more, and path 0's pass is the cost (docs/decisions.md: 1e-4 to 1e-2 give the same BPB).
PRUNE = 1e-3
# ... and is checked every PRUNE_EVERY bytes besides the decision positions: it waits less for the
# next check, at the price of more, shorter calls (docs/decisions.md).
PRUNE_EVERY = 16
# The coarse view novelty compares (:func:`coarse`): hashed two-byte contexts and add-alpha smoothing.
NOVELTY_CONTEXTS = 1024
NOVELTY_ALPHA = 0.5
# Longest context a sketch conditions on: the previous SKETCH_ORDER bytes, backed off to shorter ones.
SKETCH_ORDER = 3
# A sketch is an (M, 3) float64 table sorted by its first column, an entry's integer key (exact in
# float64): a (context, byte) pair's ``packed context * 257 + byte`` with its count and 0, or a
# context's ``_CONTEXT + packed context`` with how often it was seen and how many distinct bytes
# followed it. A model's sketches share one table, sketch i's keys offset by ``i * _SKETCH``.
_CONTEXT = 2.0 ** 35
_SKETCH = 2.0 ** 36


def _keys(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., T) bytes -> ((O + 1, ..., T) packed contexts, (O + 1, ..., T) (context, byte) keys) of every
    byte for each context order 0..O; -1 where a byte has fewer earlier bytes than the order. A packed
    context of order o is its bytes (+1) in base 257 (0 for order 0), so keys of different orders differ."""
    t = idx.long()
    ctx, packed = [torch.zeros_like(t)], torch.zeros_like(t)
    for o in range(1, SKETCH_ORDER + 1):
        packed = packed * 257 + F.pad(t, (o, 0))[..., :-o] + 1  # the byte o back
        ctx.append(packed.masked_fill(torch.arange(t.shape[-1], device=t.device) < o, -1))
    ctx = torch.stack(ctx)
    return ctx, torch.where(ctx >= 0, ctx * 257 + t, -1)


def _from_pairs(keys: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Distinct (context, byte) keys and their counts -> the sketch table, with each context's entry."""
    context, at = torch.unique(keys // 257, return_inverse=True)
    seen = torch.zeros(len(context), dtype=torch.float64).index_add_(0, at, counts)
    distinct = torch.zeros(len(context), dtype=torch.float64).index_add_(0, at, torch.ones_like(counts))
    table = torch.cat([torch.stack([keys.double(), counts, torch.zeros_like(counts)], 1),
                       torch.stack([context.double() + _CONTEXT, seen, distinct], 1)])
    return table[table[:, 0].argsort()]


def fit_sketch(tokens: torch.Tensor) -> torch.Tensor:
    """(N,) a domain's bytes -> its sketch: the count of every (context, next byte) pair for contexts of
    0..SKETCH_ORDER bytes (exact, no hashing), and of every context."""
    _, joint = _keys(tokens.flatten())
    keys, counts = torch.unique(joint[joint >= 0], return_counts=True)
    return _from_pairs(keys, counts.double())


def add_sketches(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The sketch of the text of two sketches together (counts add)."""
    pairs = torch.cat([a[a[:, 0] < _CONTEXT], b[b[:, 0] < _CONTEXT]])
    keys, at = torch.unique(pairs[:, 0].long(), return_inverse=True)
    return _from_pairs(keys, torch.zeros(len(keys), dtype=torch.float64).index_add_(0, at, pairs[:, 1]))


def stack(sketches: list[torch.Tensor]) -> torch.Tensor:
    """Sketches -> one table holding them in order (what ``GPT.path_sketches`` stores)."""
    return torch.cat([s + s.new_tensor([i * _SKETCH, 0, 0]) for i, s in enumerate(sketches)]
                     or [torch.zeros(0, 3, dtype=torch.float64)])


def unstack(table: torch.Tensor) -> list[torch.Tensor]:
    """The sketches of a table, in order (:func:`stack` undone)."""
    ids = (table[:, 0] // _SKETCH).long()
    return [table[ids == i] - table.new_tensor([i * _SKETCH, 0, 0]) for i in range(count(table))]


def count(table: torch.Tensor) -> int:
    """How many sketches a table holds (each holds at least its order-0 context)."""
    return int(table[-1, 0] // _SKETCH) + 1 if len(table) else 0


def _lookup(table: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(...) keys (float64) -> (..., 2) the table's values for them, zeros for a key it lacks."""
    flat = keys.flatten()
    at = torch.searchsorted(table[:, 0].contiguous(), flat).clamp_max(len(table) - 1)
    found = (table[at, 0] == flat)[:, None]
    return torch.where(found, table[at, 1:], 0.0).view(*keys.shape, 2)


def byte_logp(idx: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(B, T) bytes, a table of K sketches -> (B, T, K) each sketch's log-probability of each byte given
    the up to SKETCH_ORDER bytes before it in ``idx``: Witten-Bell interpolation of the orders, each
    order's estimate weighted by how often its context was seen against how many bytes followed it."""
    ctx, joint = _keys(idx)
    offset = torch.arange(count(table), dtype=torch.float64, device=idx.device).view(-1, 1, 1) * _SKETCH
    p = torch.full((count(table), *idx.shape), 1 / 256, dtype=torch.float64, device=idx.device)  # (K, B, T)
    for c, j in zip(ctx, joint):
        n, u = _lookup(table, offset + _CONTEXT + c.double()).unbind(-1)
        pair = _lookup(table, offset + j.double())[..., 0]
        p = torch.where((c >= 0) & (n > 0), (pair + u * p) / (n + u).clamp_min(1), p)
    return p.log().float().permute(1, 2, 0)


def by_path(scores: torch.Tensor, n_paths: int) -> torch.Tensor:
    """(..., K) scores of a model's K sketches -> (..., P) its paths': path 0 holds the first K - P + 1
    sketches (one per domain it learned) and scores as the best of them, each later path one."""
    first = scores.shape[-1] - n_paths + 1
    if first < 1:
        raise ValueError(f"a model of {n_paths} paths with {scores.shape[-1]} path sketches: run one path "
                         "(GPT.on_path) or mix them all (GPT.on_path(ALL_PATHS))")
    return torch.cat([scores[..., :first].amax(-1, keepdim=True), scores[..., first:]], -1)


def grown(table: torch.Tensor, n_paths: int) -> torch.Tensor:
    """The table of paths 1..P-1's sketches, in order (path 0's come first)."""
    return stack(unstack(table)[count(table) - n_paths + 1:])


def coarse(table: torch.Tensor) -> torch.Tensor:
    """A table of K sketches -> (K, NOVELTY_CONTEXTS, 256) their coarse view for novelty: next-byte
    log-probabilities after two bytes, the contexts hashed together and add-½ smoothed, from the same
    counts. The exact model routes well but is too sensitive to topic to say whether a drop is new: a
    later part of a known domain would look novel to it (docs/decisions.md)."""
    out = torch.zeros(count(table), NOVELTY_CONTEXTS, 256)
    for i, sketch in enumerate(unstack(table)):
        key = sketch[:, 0].long()
        packed = key // 257  # order 2: (byte t-1 + 1) * 257 + byte t-2 + 1, in [258, 256 * 257 + 256]
        two = (sketch[:, 0] < _CONTEXT) & (packed >= 258) & (packed <= 256 * 257 + 256)
        packed, nxt, n = packed[two], key[two] % 257, sketch[two, 1].float()
        ctx = ((packed % 257 - 1) * 257 + packed // 257 - 1) % NOVELTY_CONTEXTS
        out[i].index_put_((ctx, nxt), n, accumulate=True)
    return ((out + NOVELTY_ALPHA) / (out.sum(-1, keepdim=True) + 256 * NOVELTY_ALPHA)).log()


def record_bits(views: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(K, C, 256) coarse views, (N,) one record's bytes -> (K,) bits per byte each spends on its bytes
    from the third."""
    if len(tokens) < 3:
        return views.new_zeros(len(views))
    t = tokens.long()
    return -views[:, (t[:-2] * 257 + t[1:-1]) % NOVELTY_CONTEXTS, t[2:]].mean(1) / math.log(2)


def sketch_scores(idx: torch.Tensor, table: torch.Tensor, n_paths: int) -> torch.Tensor:
    """(B, T) bytes, a model's sketch table -> (B, T, P) each path's log-likelihood of bytes 0..t."""
    return by_path(byte_logp(idx, table).cumsum(1), n_paths)


class Assignment(NamedTuple):
    """Which grown path explains each record of a drop (:func:`assign`)."""
    path: list[int]  # per record: the grown path (>= 1) that explains it, or NOVEL
    gap: list[float]  # per record: bits per byte the best grown path's sketch spends beyond the drop's own (held out)
    best: list[int]  # per record: the grown path whose sketch explains it best (NOVEL without grown paths)


# A record no grown path explains.
NOVEL = -1


def assign(grown: torch.Tensor, records: list[torch.Tensor]) -> Assignment:
    """Per record of a drop, the grown path (1..P-1, whose sketches ``grown`` are; path 0 is the trunk
    every path builds on and is never trained again) whose sketch's :func:`coarse` view explains its
    bytes at least as well as that of a sketch of the drop itself, fitted on the other half of its
    records (even and odd ones) — a held-out stand-in for the sketch a new path grown on this drop
    would have. Such a record is known: that path consolidates
    on it. A record that no grown path explains that well is NOVEL.

    The comparison needs no threshold: on the shipped corpus a path's own domain scores 0.10 to 0.36
    bits per byte below the drop's own sketch and every other domain 0.09 to 4.9 above it
    (docs/decisions.md, "Novelty decides grow or consolidate")."""
    if not count(grown) or len(records) < 2:  # no grown path, or no held-out half to compare with
        return Assignment([NOVEL] * len(records), [math.inf] * len(records), [NOVEL] * len(records))
    halves = [torch.cat(records[i::2]) for i in (0, 1)]
    sizes, views = sketch_bytes(grown), coarse(grown)
    own: dict[tuple[int, int], torch.Tensor] = {}  # (half, bytes) -> sketch, fitted once
    out = Assignment([], [], [])
    for i, tokens in enumerate(records):
        bits = record_bits(views, tokens)  # (P - 1,)
        best = int(bits.argmin())
        # At most as many bytes as the path's sketch saw: more data alone makes a sketch better, and a
        # large repeat of a domain must not look novel for it.
        key = (1 - i % 2, min(len(halves[1 - i % 2]), int(sizes[best])))
        if key not in own:
            own[key] = coarse(fit_sketch(halves[key[0]][:key[1]]))
        gap = float(bits[best] - record_bits(own[key], tokens)[0])
        out.path.append(best + 1 if gap <= 0 else NOVEL)
        out.gap.append(gap)
        out.best.append(best + 1)
    return out


def sketch_bytes(table: torch.Tensor) -> torch.Tensor:
    """A table of K sketches -> (K,) how many bytes each was fitted on (its order-0 context count)."""
    return _lookup(table, torch.arange(count(table), dtype=torch.float64) * _SKETCH + _CONTEXT)[:, 0]


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
