"""Growth behind learned gates (``grow.select: gate``): the default before paths, kept for its
measured front (``docs/results.md``, the "gates" points of ``scripts/pareto.py``).

Each grown layer gets ``GrowConfig.experts`` experts behind one gate (:func:`hst.novelty.fit_gate`,
an MLP of width ``GrowConfig.gate_hidden`` or a linear one, :class:`hst.router.Gate`) that opens only
for tokens whose context looks like the novel records, not like the held-in ones. Their keys are the
centroids of a spherical k-means over the novel tokens that pass the gate; weights are copied from the
nearest expert (or drawn fresh); then only the new experts train on the novel records — and, given old
(replay) records too, the ones grown in earlier cycles then train on those (a ``GrowConfig.old_share``
of the steps), meant to keep learning their domain where their gate opens as every parameter of dense
+ replay does (measured: no old domain gained, ``docs/decisions.md``), while the experts present
before any growth and all shared weights stay frozen. With a forgetting budget the trained gates then
tighten (:func:`tighten`): their false-positive rate halves until no held-in source's BPB rose by
more than the budget — the experts keep what they learned, fewer old tokens reach them.
"""

from __future__ import annotations

import torch

from hst import grow as growth
from hst.config import ConfigError, GrowConfig, TrainConfig
from hst.evaluation import Evaluation, evaluate, ffn_inputs
from hst.model import GPT
from hst.novelty import fit_gate, gate_bias
from hst.router import gate_scores, scores_open


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
    new = growth.add_experts(model, [(layer, gate, 0, passing) for layer, gate, passing, _ in placed], cfg, train_cfg.seed)
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
            phase = growth.train_experts(model, experts, stream, steps, lr, train_cfg, name)
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
