"""Path sketches: byte n-gram models of the text each path was trained on, which choose a sequence's
path (:mod:`hst.paths`) and decide whether a drop's records are new (:func:`assign`).

A sketch is an exact byte n-gram model (contexts of up to :data:`SKETCH_ORDER` bytes, Witten-Bell
interpolated) of a path's records, fitted when the path is added from that path's records alone (no
other path's text). A model's sketches share one table (``GPT.path_sketches``): path 0 holds one per
domain it learned, each later path one. Scoring a byte costs a few table look-ups.

Novelty compares a coarser view of the same counts (:func:`coarse`): a record that a grown path's
sketch explains better than a sketch of the drop's own records would (fitted on the other half of
them, so held out) belongs to that path, which consolidates on it; the records no path explains
grow a new path. A repeat of a known domain adds no path.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

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
