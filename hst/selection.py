"""Running the flat-cost selection (``GPT.inference`` "select" and "select_base"): each sequence's
segments on the paths :mod:`hst.paths` chooses, and path 0 beside them, stopping and coming back by
the rule :func:`hst.paths.beside_base` replays. ``GPT.forward`` and the decoder's prompt call :func:`select`."""

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
    serves alone and path 0 runs only for the segments the selection itself gives it, until its sketch
    leads by :data:`hst.paths.REENTER` bits at a later check: then it catches up over the positions it
    skipped and is mixed again. Returns logits (log-probabilities when mixed), routing, the path each
    position got (the most weighted one) and the model passes per token spent."""
    B, T, _ = h0.shape
    spans = paths.segments(T)
    scores = model.path_scores(idx)  # (B, T, P)
    serving = paths.segment_paths(scores)  # (B, S)
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
    path0, rows = paths.Stitched(B, T), torch.arange(B, device=h0.device)
    # Path 0's runs by how far they got: cache length -> (rows, their attention caches above the trunk).
    groups = {0: (rows, [KVCache() for _ in model.blocks[1:]])}
    alive = torch.ones(B, dtype=torch.bool, device=h0.device)  # path 0 mixed beside the selection
    stop = torch.zeros(B, dtype=torch.long, device=h0.device)  # where it last stopped
    alone = torch.zeros(B, T, dtype=torch.bool, device=h0.device)  # (B, T) the selection serves alone
    ll = h0.new_zeros(2, B, T, dtype=torch.float32)  # the selection's and path 0's log-prob of byte t + 1

    def run_path_0(length: int, end: int, back: torch.Tensor, own: int | None = None) -> None:
        """Path 0 over positions length..end of the rows of ``groups[length]`` that ``back`` selects;
        they move to ``groups[end]``. ``own``: the segment whose rows the selection gives path 0."""
        nonlocal spent
        rows, caches = groups[length]
        run = back[rows]
        if not run.any():
            return
        del groups[length]
        if not run.all():
            groups[length] = (rows[~run], [c.rows(~run) for c in caches])
            rows, caches = rows[run], [c.rows(run) for c in caches]
        out, r = model.from_trunk(h0[rows, length:end], False, 0, caches)
        spent += len(rows) * (end - length)
        path0.put(rows, length, end, out, r, None, offset=length)
        if own is not None:
            mine = (serving[rows, own] == 0).to(h0.device)  # the selection's own path-0 segment
            selected.put(rows[mine], length, end, out, r, mine, offset=length)
        if end < T:
            target = idx[rows, length + 1:end + 1, None]
            ll[1, rows, length:end] = path0.logits[rows, length:end].log_softmax(-1).gather(-1, target)[..., 0]
        if end in groups:
            old, cached = groups[end]
            rows, caches = torch.cat([old, rows]), [KVCache.join([a, c]) for a, c in zip(cached, caches)]
        groups[end] = (rows, caches)

    plan = paths.pieces(T)
    for (start, end, s), (_, _, after) in zip(plan, plan[1:] + [(T, T, 0)]):
        alone[:, start:end] = ~alive[:, None]
        if start in groups:  # path 0 runs where it is mixed, and where the selection serves it now or later
            run_path_0(start, end, alive | (serving[:, s:] == 0).any(1).to(h0.device), own=s)
        if end == T:
            break
        # A check position: path 0 stops where its posterior weight given bytes 1..end is below PRUNE, and a
        # stopped one comes back where its sketch has led since (hst.paths.keep_base), catching up first.
        target = idx[:, start + 1:end + 1, None]
        ll[0, :, start:end] = selected.logits[:, start:end].log_softmax(-1).gather(-1, target)[..., 0]
        total = ll[:, :, :end].sum(-1)
        lead = paths.sketch_lead(scores[:, end], scores[rows, stop], serving[:, after].to(h0.device))
        back = paths.keep_base(alive, (total[1] - total[0]).sigmoid(), lead)
        for length in sorted(groups):
            if length < end:
                run_path_0(length, end, back & ~alive)
        stop, alive = torch.where(alive & ~back, end, stop), back
    logits, weights = paths.mix_paths(torch.stack([selected.logits, path0.logits]), idx)
    logits = torch.where(alone[..., None], selected.logits.log_softmax(-1), logits)
    on_base = (weights[1] > weights[0]) & ~alone
    routing = paths.most_weighted([selected.routing(), path0.routing()], on_base.long())
    return logits, routing, chosen.masked_fill(on_base, 0), spent / (B * T)
