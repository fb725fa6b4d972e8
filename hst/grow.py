"""Expert growth: add gated experts for data the model finds novel, then train only them.

Each grown layer gets ``GrowConfig.experts`` experts behind one gate (:func:`hst.novelty.fit_gate`,
an MLP of width ``GrowConfig.gate_hidden`` or a linear one) that opens only for tokens whose context
looks like the novel records, not like the held-in ones.
Their keys are the centroids of a spherical k-means over the novel tokens that pass the gate (for
one expert: their normalized mean) — not of all novel hidden states, which point along the
direction every hidden state shares (``docs/prototype.md``) — so the new experts split the new data
between them. Weights are copied from the expert nearest each key (or drawn fresh); then only the
new experts train on the novel records — and, given old (replay) records too, the ones grown in
earlier cycles then train on those (a ``GrowConfig.old_share`` of the steps), meant to keep learning
their domain where their gate opens as every parameter of dense + replay does (measured: no old
domain gained, ``docs/decisions.md``), while the experts present before any growth and all shared
weights stay frozen. With a forgetting budget the trained gates then tighten (:func:`tighten`):
their false-positive rate halves until no held-in source's BPB rose by more than the budget — the
experts keep what they learned, fewer old tokens reach them.

With ``GrowConfig.select: posterior`` a growth adds a *path* instead (:func:`grow_path`): its experts
are eligible only when the model runs that path, which trains alone on the novel records; the model
serves its paths as ``GrowConfig.inference`` says (by default the path its sketches select, mixed with
path 0 by their posterior: :mod:`hst.paths`, :func:`hst.model.mix_paths`). No held-in text
is read and nothing needs calibrating. A path consolidates (:func:`consolidate_path`) only on
records its sketch explains (:func:`hst.paths.assign`): a repeat of its domain trains it further,
every other path computes exactly what it did.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import pyarrow as pa
import torch

from hst import coreset, paths
from hst.config import ConfigError, GrowConfig, TrainConfig
from hst.consolidate import ema_key, ffn_inputs, only_trainable
from hst.data import encode
from hst.model import GPT
from hst.novelty import fit_gate, gate_bias
from hst.router import Gate, gate_scores, scores_open, spherical_kmeans
from hst.sampler import tokens_by_source
from hst.train import Evaluation, evaluate, train


def grow(model: GPT, layers: list[int], novel: torch.Tensor, held_in: dict[str, torch.Tensor], cfg: GrowConfig,
         train_cfg: TrainConfig, replay: torch.Tensor | None = None) -> tuple[list[tuple[int, int]], dict, list[dict]]:
    """Add ``cfg.experts`` gated experts to each of ``layers`` and train the new experts on ``novel``
    tokens at ``cfg.lr`` (``train_cfg`` gives the rest of the schedule).

    ``held_in`` maps each learned domain (source) to its tokens; every gate lets at most
    ``cfg.gate_fpr`` of each source's tokens through. With ``replay`` (old records' tokens) the
    experts grown in earlier cycles then train on it for ``cfg.old_share`` of ``cfg.steps`` (the new
    ones get the rest, on ``novel``) at ``train_cfg.lr``, the rate shared experts consolidate at:
    they converged in their own cycle, a re-warm to ``cfg.lr`` moved them off it. With
    ``cfg.forgetting_budget`` the trained gates then tighten (:func:`tighten`; the held-in sources'
    relative BPB change lands in the curves as ``held_in_bpb_change``). Returns the new ``(layer,
    expert)`` pairs, the training curves and per-layer gate statistics (at the gates' final rate,
    ``gate_fpr``).
    """
    if cfg.select == "posterior":
        base = None if len(model.path_sketches) else torch.cat([t.flatten() for t in held_in.values()] or [novel[:0]])
        return grow_path(model, layers, novel, cfg, train_cfg, base)
    if model.n_paths > 1:
        raise ConfigError("grow.select: gate, but this model grew paths (grow.select: posterior); a model keeps the "
                          "select it first grew with")
    # Every gate is fitted on the model before growth: adding an expert to one layer must not
    # shift the features a later layer's gate is fitted on.
    # The held-in passes also give the start model's per-window BPB the forgetting budget is measured against.
    x_new = ffn_inputs(model, novel, layers, cfg.gate_windows)  # per layer (W, T, d)
    start = {src: evaluate(model, t, cfg.gate_windows, layers=layers) for src, t in held_in.items()}
    x_old = {src: e.ffn_inputs for src, e in start.items()}
    placed = []
    for i, layer in enumerate(layers):
        router = model.moe(layer).router
        f_new = router.features(x_new[i])
        f_old = {src: router.features(x[i]) for src, x in x_old.items()}
        gate = fit_gate(list(f_old.values()), f_new, cfg.gate_fpr, cfg.gate_hidden, train_cfg.seed)
        scores = gate_scores(f_new, gate), {src: gate_scores(f, gate) for src, f in f_old.items()}
        placed.append((layer, gate, f_new[scores_open(scores[0], gate.b)], scores))
    placed = [p for p in placed if len(p[2])]
    new = add_experts(model, [(layer, gate, -1, passing) for layer, gate, passing, _ in placed], cfg, train_cfg.seed)
    added = [(layer, e) for layer, _, experts in new for e in experts]
    grown = [(layer, index, scores) for (layer, index, _), (_, _, _, scores) in zip(new, placed)]
    stats = [{"layer": layer, "expert": experts[0], "experts": experts} for layer, _, experts in new]
    # With replay, the experts grown earlier train after the new ones, on the old records only: trained
    # on the mixed stream they also learned the new domain's tokens their gates admit, and drifted
    # (kjv lost ~5 % a cycle at old_share 0.2; in this order 4.9 % at grow.lr, 0.2 % at the consolidation
    # rate — yet no old domain gained either: docs/decisions.md).
    earlier = [] if replay is None else [
        (layer, e) for layer in range(model.cfg.n_layer)
        for e in (model.moe(layer).router.expert_gate >= 0).nonzero()[:, 0].tolist() if (layer, e) not in added]
    old_steps = round(cfg.steps * cfg.old_share) if earlier else 0
    curves = {"train": []}
    for experts, stream, steps, lr, name in ((added, novel, cfg.steps - old_steps, cfg.lr, "grow"),
                                             (earlier, replay, old_steps, train_cfg.lr, "grow (earlier experts)")):
        if experts and steps > 0:
            phase = train_experts(model, experts, stream, steps, lr, train_cfg, name)
            curves["train"] += [row | {"step": row["step"] + len(curves["train"])} for row in phase]
    fpr = cfg.gate_fpr
    if cfg.forgetting_budget and grown:
        fpr, curves["held_in_bpb_change"] = tighten(model, grown, held_in, start, cfg, rerun_all=old_steps > 0)
    for stat, (layer, index, (s_new, s_old)) in zip(stats, grown):
        b = model.moe(layer).router.gate_b[index]
        per_source = {src: float(scores_open(s, b).float().mean()) for src, s in s_old.items()}
        stat |= {"gate_fpr": fpr, "novel_tokens_passing": float(scores_open(s_new, b).float().mean()),
                 "held_in_tokens_passing": sum(per_source.values()) / len(per_source),
                 "held_in_tokens_passing_per_source": per_source}
    return added, curves, stats


def grow_path(model: GPT, layers: list[int], novel: torch.Tensor, cfg: GrowConfig, train_cfg: TrainConfig,
              base: torch.Tensor | None = None) -> tuple[list[tuple[int, int]], dict, list[dict]]:
    """Add a path: ``cfg.experts`` experts in each of ``layers`` behind that layer's gate of the new
    path, keyed by a spherical k-means of the novel tokens' features on the base path and copied from
    the nearest base expert, then train them on ``novel`` running the new path alone, and sketch it
    (:func:`hst.paths.fit_sketch` of ``novel``); the model then runs its paths as ``cfg.inference``
    says. The first path needs ``base``, text of the base path's domains (or samples of it), for path
    0's sketch; later ones read nothing but ``novel``. Every earlier path computes exactly what it
    did. Returns what :func:`grow` returns (no gate statistics)."""
    path = model.n_paths
    if any((model.moe(layer).router.gate_path < 0).any() for layer in range(model.cfg.n_layer)):
        raise ConfigError("grow.select: posterior, but this model grew learned gates (grow.select: gate); a model "
                          "keeps the select it first grew with")
    if not len(model.path_sketches) and path == 1 and base is not None and len(base) > 2:
        model.add_path_sketch(paths.fit_sketch(base, model.cfg.vocab_size))
    if len(model.path_sketches) != path:
        raise ConfigError(f"grow: a model of {path} paths with {len(model.path_sketches)} path sketches cannot grow "
                         "one (the first path needs the base path's text for path 0's sketch; paths grown before "
                         "sketches existed have none)")
    with model.on_path(0):
        x_new = ffn_inputs(model, novel, layers, cfg.gate_windows)  # per layer (W, T, d)
    d = model.cfg.d_model
    features = [model.moe(layer).router.features(x).flatten(0, 1) for layer, x in zip(layers, x_new)]  # (W·T, d)
    new = add_experts(model, [(layer, Gate.linear(torch.zeros(d), 0.0, 0.0), path, f) for layer, f in zip(layers, features)],
                      cfg, train_cfg.seed)
    added = [(layer, e) for layer, _, experts in new for e in experts]
    stats = [{"layer": layer, "expert": experts[0], "experts": experts, "path": path} for layer, _, experts in new]
    curves = {"train": []}
    if cfg.steps > 0:
        with model.on_path(path):
            curves["train"] = train_experts(model, added, novel, cfg.steps, cfg.lr, train_cfg, f"grow path {path}")
    model.add_path_sketch(paths.fit_sketch(novel, model.cfg.vocab_size))
    model.inference = cfg.inference
    return added, curves, stats


class Plan(NamedTuple):
    """What a cycle does with its records under ``grow.decide: novelty`` (:func:`plan`)."""
    consolidate: dict[int, list[int]]  # known path -> the indices of the records it consolidates on
    grow: list[int]  # records a new path grows from (empty: no path grows)
    left: list[int]  # records nothing learns: too few to grow a path from
    assignment: paths.Assignment  # per record: the path whose sketch explains it, the gap, the best path


def plan(sketches: torch.Tensor, records: list[torch.Tensor], min_records: int) -> Plan:
    """Grow or consolidate: every record goes to the grown path that explains it
    (:func:`hst.paths.assign`); a path explaining at least ``min_records`` consolidates on them, and the
    rest — records no path explains, and those of paths explaining fewer — grow a new path if there are
    at least ``min_records`` of them, else are left."""
    found = paths.assign(sketches, records)
    groups: dict[int, list[int]] = {}
    for i, path in enumerate(found.path):
        groups.setdefault(path, []).append(i)
    known = {p: rows for p, rows in sorted(groups.items()) if p != paths.NOVEL and len(rows) >= min_records}
    rest = sorted(i for p, rows in groups.items() if p not in known for i in rows)
    return Plan(known, rest if len(rest) >= min_records else [], [] if len(rest) >= min_records else rest, found)


def learn(model: GPT, new: pa.Table, index: pa.Table, owners: list[list[str]], domain: str, cfg: GrowConfig,
          tcfg: TrainConfig, new_old_ratio: float, seed: int) -> tuple[dict, list[dict]]:
    """Novelty decides (``grow.decide: novelty``, :func:`plan`): each known path consolidates on the new
    records (Smart Sampler rows) it explains mixed with its own stored ones (``index`` rows of its
    domains, at ``new_old_ratio``); the rest grow a path, from ``domain`` records.
    ``cfg.steps`` is shared by the trained paths in proportion to their new records. Updates ``owners``
    (the domains of each path) in place; returns the decision's report and the training curve."""
    texts = new["text"].to_pylist()
    todo = plan(model.path_sketches, [encode([t]) for t in texts], cfg.min_records)
    used = sum(map(len, todo.consolidate.values())) + len(todo.grow)
    share = {p: round(cfg.steps * len(rows) / used) for p, rows in todo.consolidate.items()}
    curve, consolidated = [], {}
    for path, rows in todo.consolidate.items():
        mine = new.take(rows)
        stored = index.filter(pa.array([s in owners[path] for s in index["source"].to_pylist()]))
        stream = coreset.mix(mine, stored, new_old_ratio, seed)
        curve += consolidate_path(model, path, encode(stream["text"].tolist()), encode(mine["text"].to_pylist()),
                                  share[path], cfg, tcfg)
        consolidated[path] = {"new_records": len(rows), "old_records": int((stream["kind"] == "old").sum()),
                              "steps": share[path]}
        owners[path] += [domain] if domain not in owners[path] else []
    grown_path = None
    if todo.grow:  # the first path sketches path 0 from the index's text (grow reads it only then)
        held_in = {} if len(model.path_sketches) else tokens_by_source(index)
        _, phase, _ = grow(model, list(range(model.cfg.n_layer)), encode([texts[i] for i in todo.grow]), held_in,
                           dataclasses.replace(cfg, steps=cfg.steps - sum(share.values())), tcfg)
        curve += phase["train"]
        grown_path = model.n_paths - 1
        owners.append([domain])
    gaps = [g for g in todo.assignment.gap if math.isfinite(g)]
    return {"grown_path": grown_path, "grow_records": len(todo.grow), "consolidated": consolidated,
            "left_records": len(todo.left), "mean_gap_bits": sum(gaps) / len(gaps) if gaps else None,
            "records_per_best_path": {str(p): todo.assignment.best.count(p) for p in sorted(set(todo.assignment.best))},
            "path_domains": owners}, [row | {"step": i + 1} for i, row in enumerate(curve)]


def path_domains(meta: dict, n_paths: int) -> list[list[str]]:
    """The domains each path learned, from a checkpoint's meta (``path_domains``; a checkpoint from
    before it was stored grew one path per cycle after pretraining, which it derives from)."""
    if "path_domains" in meta:
        return [list(d) for d in meta["path_domains"]]
    learned = list(meta["learned_domains"])
    first = len(learned) - (n_paths - 1)
    return [learned[:first], *([d] for d in learned[first:])]


def path_experts(model: GPT, path: int) -> list[tuple[int, int]]:
    """The ``(layer, expert)`` pairs that growth ``path`` (>= 1) added, at every layer."""
    out = []
    for layer in range(model.cfg.n_layer):
        router = model.moe(layer).router
        grown = router.expert_gate >= 0
        mine = torch.zeros_like(grown)
        mine[grown] = router.gate_path[router.expert_gate[grown]] == path
        out += [(layer, e) for e in mine.nonzero()[:, 0].tolist()]
    return out


def consolidate_path(model: GPT, path: int, stream: torch.Tensor, new: torch.Tensor, steps: int, cfg: GrowConfig,
                     train_cfg: TrainConfig, key_windows: int = 16) -> list[dict]:
    """Consolidate a known path (seed §5): train only its experts, running that path alone, on ``stream``
    (the cycle's records it explains mixed with its own stored ones) for ``steps`` at ``cfg.lr``, then
    move each of their keys one EMA step toward the ``new`` tokens routed to it (seed §3.2). Every
    other path computes exactly what it did: their experts, the shared ones and every key but these stay
    bit-identical. Returns the training curve."""
    experts = path_experts(model, path)
    if not experts:
        raise ConfigError(f"grow: path {path} has no experts to consolidate (the model has {model.n_paths} paths)")
    with model.on_path(path):
        curve = train_experts(model, experts, stream, steps, cfg.lr, train_cfg, f"consolidate path {path}")
        for layer, expert in experts:
            ema_key(model, layer, expert, new, key_windows, path)
    return curve


def add_experts(model: GPT, placements: list[tuple[int, Gate, int, torch.Tensor]], cfg: GrowConfig,
                seed: int) -> list[tuple[int, int, list[int]]]:
    """For each ``(layer, gate, path, features)``: add the gate (of ``path``; -1: a learned gate) and
    ``cfg.experts`` experts behind it, keyed by a spherical k-means of the unit ``features`` (N, d) of
    the tokens they are for. Returns ``(layer, gate index, new expert ids)`` per placement.

    ``init: random`` draws from ``seed``, not from whatever the process drew before: the grown model
    is then a function of the inputs in a library caller as in a fresh stage process."""
    out = []
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for layer, gate, path, features in placements:
            index = model.moe(layer).router.add_gate(gate, path)
            out.append((layer, index, [model.add_expert(layer, key, cfg.init, index)
                                       for key in spherical_kmeans(features, cfg.experts)]))
    return out


def train_experts(model: GPT, experts: list[tuple[int, int]], stream: torch.Tensor, steps: int, lr: float,
                  train_cfg: TrainConfig, desc: str) -> list[dict]:
    """Train only ``experts`` on ``stream`` for ``steps`` at peak ``lr`` (the rest of ``train_cfg``'s
    schedule, its warm-up capped at ``steps``; keys fixed); returns the training curve."""
    tcfg = dataclasses.replace(train_cfg, domains=("stream",), steps=steps, lr=lr, update_keys=False,
                               warmup_steps=min(train_cfg.warmup_steps, steps))
    with only_trainable(model, experts):
        return train(model, tcfg, {"stream": stream}, {}, desc=desc)["train"]


# How often :func:`tighten` may halve the new gates' false-positive rate (down to 1/16 of it).
TIGHTEN_STEPS = 4
# A window whose gate running mean comes this close to opening counts as opened (see :func:`opened_windows`).
ROUNDING_MARGIN = 1e-3


def tighten(model: GPT, grown: list[tuple[int, int, tuple]], held_in: dict[str, torch.Tensor],
            start: dict[str, Evaluation], cfg: GrowConfig, rerun_all: bool = False) -> tuple[float, dict[str, float]]:
    """Halve the false-positive rate of the gates just grown (``(layer, gate index, (novel scores,
    held-in scores per source))``) until no held-in source's BPB (on the windows the gates are
    calibrated on) rose by more than ``cfg.forgetting_budget`` over ``start`` (the start model's
    evaluations of those windows), at most :data:`TIGHTEN_STEPS` times. The gate's rate is a proxy;
    what a false positive costs depends on how far the new experts moved (German experts on English
    tokens cost more than kjv experts), which only the trained model shows. Returns the rate kept
    and each source's relative BPB change at it.

    Only the windows in which a new gate opens run again (:func:`opened_windows`); every other window
    computes what it did before growth — unless ``rerun_all`` (experts grown earlier trained too). A
    rate is rejected at the first source over the budget, and that source is measured first at the
    next rate: the one closest to the new data usually decides every step, and the others' passes
    are skipped (the decisions are those of measuring every source)."""
    fpr, order = cfg.gate_fpr, list(held_in)
    for step in range(TIGHTEN_STEPS + 1):
        if step:
            fpr /= 2
            for layer, index, (_, s_old) in grown:
                model.moe(layer).router.gate_b[index] = gate_bias(list(s_old.values()), fpr)
        change = {}
        for src in order:
            window_bpb = start[src].window_bpb.clone()
            opened = opened_windows(model, [(layer, index, s_old[src]) for layer, index, (_, s_old) in grown])
            opened |= rerun_all
            if opened.any():
                window_bpb[opened] = evaluate(model, held_in[src], cfg.gate_windows, only=opened).window_bpb
            change[src] = float(window_bpb.mean()) / start[src].bpb - 1
            if change[src] > cfg.forgetting_budget and step < TIGHTEN_STEPS:
                order = [src] + [s for s in order if s != src]
                break
        else:
            break
    return fpr, {src: change[src] for src in held_in}


def opened_windows(model: GPT, scores: list[tuple[int, int, torch.Tensor]]) -> torch.Tensor:
    """(W,) bool: the windows in which a token passes one of the gates ``(layer, gate index, the
    start model's (W, T) scores of the windows' tokens)`` at the gate's current bias.

    In any other window every layer computes what it did before growth: at each layer the gate sees
    the start model's features (no earlier gate opened), stays closed and leaves routing and output
    as they were. The scores come from one batched pass, the model's own from batches of 32 windows;
    a window within :data:`ROUNDING_MARGIN` of opening counts as opened so float rounding cannot hide one.
    """
    opened = [scores_open(s, model.moe(layer).router.gate_b[index] + ROUNDING_MARGIN).any(-1)
              for layer, index, s in scores]
    return torch.stack(opened).any(0)
