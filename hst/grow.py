"""Growth by paths: add a path of experts for what the model finds new, consolidate a path on what
it already knows, and decide which of the two a cycle's records call for.

A growth adds a *path* (:func:`grow`): ``GrowConfig.experts`` experts per layer, eligible only when
the model runs that path (:class:`hst.router.KeyRouter`'s ``expert_path``), which trains alone on the
novel records while path 0 (the pretrained experts) and every earlier path stay bit-identical. Their
keys are the centroids of a spherical k-means over the novel tokens' features on path 0 — not the
normalized mean of all novel hidden states, which points along the direction every hidden state
shares (``docs/prototype.md``) — so the new experts split the new data between them; weights are
copied from the nearest path-0 expert (or drawn fresh). With ``GrowConfig.head: path`` the path also
trains an output head of its own (:mod:`hst.heads`), a copy of path 0's to start; consolidation
trains the path's experts only. The model serves its paths as
``GrowConfig.inference`` says (by default the path its sketches select, mixed with path 0 by their
posterior: :mod:`hst.paths`). No held-in text is read beyond path 0's sketch and nothing needs
calibrating. A path consolidates (:func:`consolidate_path`) only on records its sketch explains
(:func:`plan`, :func:`hst.sketches.assign`): a repeat of its domain trains it further, every other path
computes exactly what it did (:func:`learn`).

Growth behind learned gates (``GrowConfig.select: gate``, the default before paths) lives in
:mod:`hst.gates`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import pyarrow as pa
import torch

from hst import coreset, paths, sketches
from hst.config import ConfigError, GrowConfig, TrainConfig
from hst.consolidate import ema_key
from hst.data import encode
from hst.evaluation import ffn_inputs
from hst.model import GPT
from hst.router import Gate, spherical_kmeans
from hst.sampler import tokens_by_source
from hst.train import only_trainable, train


def grow(model: GPT, layers: list[int], novel: torch.Tensor, held_in: dict[str, torch.Tensor], cfg: GrowConfig,
         train_cfg: TrainConfig) -> tuple[list[tuple[int, int]], dict, list[dict]]:
    """Add a path: ``cfg.experts`` experts in each of ``layers`` on the new path, keyed by a spherical
    k-means of the novel tokens' features on path 0 and copied from the nearest path-0 expert, then
    train them (and, with ``cfg.head: path``, the path's own output head) on ``novel`` (at ``cfg.lr``;
    ``train_cfg`` gives the rest of the schedule) running the new path alone, and sketch it
    (:func:`hst.sketches.fit_sketch` of ``novel``); the model then runs its paths as ``cfg.inference``
    says. The first path sketches path 0 from ``held_in`` (each learned domain's tokens, or samples of
    them); later ones read nothing but ``novel``. Every earlier path
    computes exactly what it did. Returns the new ``(layer, expert)`` pairs, the training curve and
    per-layer statistics."""
    path = model.n_paths
    if model.gated:
        raise ConfigError("grow.select: posterior, but this model grew learned gates (grow.select: gate); a model "
                          "keeps the select it first grew with")
    if not len(model.path_sketches) and path == 1:
        for tokens in held_in.values():  # one sketch per domain path 0 learned
            model.add_path_sketch(sketches.fit_sketch(tokens))
    if sketches.count(model.path_sketches) < path:
        raise ConfigError(f"grow: a model of {path} paths with {sketches.count(model.path_sketches)} path sketches "
                          "cannot grow one (the first path needs the base path's text for path 0's sketch; paths "
                          "grown before sketches existed have none)")
    x_new = ffn_inputs(model, novel, layers, cfg.gate_windows, path=0)  # per layer (W, T, d)
    features = [model.moe(layer).router.features(x).flatten(0, 1) for layer, x in zip(layers, x_new)]  # (W·T, d)
    new = add_experts(model, [(layer, None, path, f) for layer, f in zip(layers, features)], cfg, train_cfg.seed)
    added = [(layer, e) for layer, _, experts in new for e in experts]
    stats = [{"layer": layer, "expert": experts[0], "experts": experts, "path": path} for layer, _, experts in new]
    if cfg.head == "path":
        model.path_heads.add(path, model.lm_head.weight)
    curves = {"train": []}
    if cfg.steps > 0:
        curves["train"] = train_experts(model, added, novel, cfg.steps, cfg.lr, train_cfg, f"grow path {path}",
                                        model.path_heads.own(path), path)
    model.add_path_sketch(sketches.fit_sketch(novel))
    model.inference = cfg.inference
    return added, curves, stats


class Plan(NamedTuple):
    """What a cycle does with its records under ``grow.decide: novelty`` (:func:`plan`)."""
    consolidate: dict[int, list[int]]  # known path -> the indices of the records it consolidates on
    grow: list[int]  # records a new path grows from (empty: no path grows)
    left: list[int]  # records nothing learns: too few to grow a path from
    assignment: sketches.Assignment  # per record: the path whose sketch explains it, the gap, the best path


def plan(grown: torch.Tensor, records: list[torch.Tensor], min_records: int) -> Plan:
    """Grow or consolidate: every record goes to the grown path (``grown``: their sketches) that explains it
    (:func:`hst.sketches.assign`); a path explaining at least ``min_records`` consolidates on them, and the
    rest — records no path explains, and those of paths explaining fewer — grow a new path if there are
    at least ``min_records`` of them, else are left."""
    found = sketches.assign(grown, records)
    groups: dict[int, list[int]] = {}
    for i, path in enumerate(found.path):
        groups.setdefault(path, []).append(i)
    known = {p: rows for p, rows in sorted(groups.items()) if p != sketches.NOVEL and len(rows) >= min_records}
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
    todo = plan(paths.grown(model.path_sketches, model.n_paths), [encode([t]) for t in texts], cfg.min_records)
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
    return [(layer, e) for layer in range(model.cfg.n_layer)
            for e in (model.moe(layer).router.expert_path == path).nonzero()[:, 0].tolist()]


def consolidate_path(model: GPT, path: int, stream: torch.Tensor, new: torch.Tensor, steps: int, cfg: GrowConfig,
                     train_cfg: TrainConfig, key_windows: int = 16) -> list[dict]:
    """Consolidate a known path (seed §5): train only its experts, running that path alone, on ``stream``
    (the cycle's records it explains mixed with its own stored ones) for ``steps`` at ``cfg.lr``, then
    move each of their keys one EMA step toward the ``new`` tokens routed to it (seed §3.2), and add
    ``new``'s counts to the path's sketch (counts add: the sketch is then one of all its records).
    The path's own head stays as growth left it: training it again on each repeat drifted the other
    domains whose windows the path serves (python +3.3 % over the stream scenario, docs/decisions.md).
    Every other path computes exactly what it did: their experts, the shared ones, their sketches and
    every key but these stay bit-identical. Returns the training curve."""
    experts = path_experts(model, path)
    if not experts:
        raise ConfigError(f"grow: path {path} has no experts to consolidate (the model has {model.n_paths} paths)")
    curve = train_experts(model, experts, stream, steps, cfg.lr, train_cfg, f"consolidate path {path}", path=path)
    for layer, expert in experts:
        ema_key(model, layer, expert, new, key_windows, path)
    table = sketches.unstack(model.path_sketches)
    mine = len(table) - model.n_paths + path
    table[mine] = sketches.add_sketches(table[mine], sketches.fit_sketch(new))
    model.path_sketches = sketches.stack(table).to(model.path_sketches.device)
    return curve


def add_experts(model: GPT, placements: list[tuple[int, Gate | None, int, torch.Tensor]], cfg: GrowConfig,
                seed: int) -> list[tuple[int, int | None, list[int]]]:
    """For each ``(layer, gate, path, features)``: add ``cfg.experts`` experts behind the learned
    ``gate`` (None: no gate) on ``path`` (0: every path), keyed by a spherical k-means of the unit
    ``features`` (N, d) of the tokens they are for. Returns ``(layer, gate index, new expert ids)`` per
    placement.

    ``init: random`` draws from ``seed``, not from whatever the process drew before: the grown model
    is then a function of the inputs in a library caller as in a fresh stage process."""
    out = []
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for layer, gate, path, features in placements:
            index = None if gate is None else model.moe(layer).router.add_gate(gate)
            out.append((layer, index, [model.add_expert(layer, key, cfg.init, index, path)
                                       for key in spherical_kmeans(features, cfg.experts)]))
    return out


def train_experts(model: GPT, experts: list[tuple[int, int]], stream: torch.Tensor, steps: int, lr: float,
                  train_cfg: TrainConfig, desc: str, also: list[torch.nn.Parameter] = (),
                  path: int | None = None) -> list[dict]:
    """Train only ``experts`` (and the parameters ``also``) on ``stream`` for ``steps`` at peak ``lr`` (the rest of
    ``train_cfg``'s schedule, its warm-up capped at ``steps``; keys fixed), running ``path``; returns the
    training curve."""
    tcfg = dataclasses.replace(train_cfg, domains=("stream",), steps=steps, lr=lr, update_keys=False,
                               warmup_steps=min(train_cfg.warmup_steps, steps))
    with only_trainable(model, experts, also):
        return train(model, tcfg, {"stream": stream}, {}, desc=desc, path=path)["train"]
