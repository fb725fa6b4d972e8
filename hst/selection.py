"""Running the flat-cost selection (``GPT.inference`` "select" and "select_base"): each sequence's
segments on the paths :mod:`hst.paths` chooses, and path 0 beside them until it stops. ``GPT.forward`` and the decoder's prompt call :func:`select`."""

from __future__ import annotations

import torch

from hst import paths
from hst.attention import KVCache
from hst.router import Routing


def select(model, idx: torch.Tensor, h0: torch.Tensor, base: bool = False
           ) -> tuple[torch.Tensor, list[Routing | None], torch.Tensor, float]:
    """Each sequence of ``idx`` (B, T) runs on ``model`` (a :class:`hst.model.GPT`) the paths :mod:`hst.paths`
    chooses for its segments (a bounded number, whatever the number of paths), from the trunk output ``h0``;
    each segment's logits and routing come from its own path.

    ``base``: path 0 also runs beside the selection, piece by piece with a cache, and the two are mixed
    by their posterior (:func:`hst.paths.mix_paths`) until path 0's weight falls below
    :data:`hst.paths.PRUNE` at a check position (:func:`hst.paths.checks`); from there on the selection
    serves alone and path 0 runs only for the segments the selection itself gives it
    (:func:`hst.paths.pruned` replays the rule). Returns logits (log-probabilities when mixed), routing,
    the path each position got (the most weighted one) and the model passes per token spent."""
    B, T, _ = h0.shape
    spans = paths.segments(T)
    serving = paths.segment_paths(model.path_scores(idx))  # (B, S)
    selected, spent = paths.Stitched(B, T), 0
    by_length: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for (p, length), rows in paths.runs(serving, T).items():
        if not (base and p == 0):  # with base, path 0's segments come from its own run below
            by_length.setdefault(length, []).append((p, rows.to(h0.device)))
    for length, runs in by_length.items():  # one call per length: each row with its own path
        rows = torch.cat([r for _, r in runs])
        path = torch.cat([r.new_full((len(r),), p) for p, r in runs])
        out, r = model.from_trunk(h0[rows, :length], False, path)
        spent += len(rows) * length
        for s, (start, end) in enumerate(spans):
            pick = serving[rows, s] == path  # the rows whose segment s this run's path serves
            if end <= length and pick.any():
                selected.put(rows[pick], start, end, out, r, pick)
    chosen = torch.cat([serving[:, s:s + 1].expand(B, end - start) for s, (start, end) in enumerate(spans)], 1)
    chosen = chosen.to(h0.device)
    if not base:
        return selected.logits, selected.routing(), chosen, spent / (B * T)
    path0, caches = paths.Stitched(B, T), [KVCache() for _ in model.blocks[1:]]
    rows = torch.arange(B, device=h0.device)
    pruned_at = torch.full((B,), T, device=h0.device)  # where path 0 stops counting for each sequence
    seen = h0.new_zeros(2, B, dtype=torch.float32)  # path 0's and the selection's log-likelihood of bytes 1..end
    for start, end, s in paths.pieces(T):
        need = (pruned_at == T) | (serving[:, s:] == 0).any(1).to(h0.device)
        keep = need[rows]
        if not keep.all():
            rows, caches = rows[keep], [c.rows(keep) for c in caches]
        if not len(rows):
            break
        out, r = model.from_trunk(h0[rows, start:end], False, 0, caches)
        spent += len(rows) * (end - start)
        path0.put(rows, start, end, out, r, None, offset=start)
        own = (serving[rows, s] == 0).to(h0.device)  # the selection's own path-0 segments
        selected.put(rows[own], start, end, out, r, own, offset=start)
        if end < T:  # a check position: each sequence's posterior weight of path 0 given bytes 1..end
            target = idx[rows, start + 1:end + 1, None]
            seen[:, rows] += torch.stack([x.logits[rows, start:end].log_softmax(-1).gather(-1, target)[..., 0].sum(1)
                                          for x in (path0, selected)])
            weak = (pruned_at == T) & ((seen[0] - seen[1]).sigmoid() < paths.PRUNE)
            pruned_at[weak] = end
    logits, weights = paths.mix_paths(torch.stack([selected.logits, path0.logits]), idx)
    alone = torch.arange(T, device=h0.device)[None] >= pruned_at[:, None]  # (B, T)
    logits = torch.where(alone[..., None], selected.logits.log_softmax(-1), logits)
    on_base = (weights[1] > weights[0]) & ~alone
    routing = paths.most_weighted([selected.routing(), path0.routing()], on_base.long())
    return logits, routing, chosen.masked_fill(on_base, 0), spent / (B * T)
