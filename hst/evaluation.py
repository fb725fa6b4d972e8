"""Evaluation (seed §10): bits per byte and routing on evaluation windows (:func:`evaluate`, the MoE
inputs it captures: :func:`ffn_inputs`), and the continual-learning report: BPB matrix, forgetting,
absorption, routing stability.

BPB is "lower is better", so forgetting on domain d is the relative rise ``(after - before) /
before`` and absorption is the drop ``before - after`` on the new domain. The R matrix has one row
per checkpoint (pretrain, then every cycle) and one column per domain.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from hst import metrics
from hst.data import window_starts
from hst.model import GPT

LN2 = math.log(2)


def eval_windows(tokens: torch.Tensor, seq_len: int, n_windows: int) -> torch.Tensor:
    """Deterministic, evenly spaced windows (n, seq_len + 1) over a token stream."""
    return torch.stack([tokens[s:s + seq_len + 1] for s in window_starts(len(tokens), seq_len, n_windows)]).long()


@contextmanager
def eval_mode(model: GPT):
    """Run a block in eval mode and restore the previous mode afterwards, even on error."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class Evaluation(NamedTuple):
    bpb: float  # bits per byte, the mean over windows (all of seq_len bytes)
    window_bpb: torch.Tensor  # (windows,) each evaluated window's bits per byte
    expert_ids: list[torch.Tensor | None]  # per layer (N, k) routed experts of every evaluated token
    ffn_inputs: tuple[torch.Tensor, ...] = ()  # per requested layer (windows, T, d) hidden states entering its MoE
    passes: float = 1.0  # model passes per token the forward spent on these windows (ModelOutput.passes)


@torch.no_grad()
def evaluate(model: GPT, tokens: torch.Tensor, n_windows: int, batch_size: int = 32,
             layers: Sequence[int] = (), only: torch.Tensor | None = None, path: int | None = None) -> Evaluation:
    """Bits per byte and routing on evenly spaced windows, fp32, eval mode, running ``path`` (``GPT.forward``);
    with ``layers``, also the inputs of those layers' MoE blocks from the same forward pass (the growth
    gates' features). ``only``: a (n_windows,) bool mask, the windows to evaluate (every field covers just those)."""
    if layers and model.path_mode(path) != "one":
        raise ValueError("evaluate: a model of several paths has no single MoE input per layer; run one path "
                         "(a path number)")
    windows = eval_windows(tokens, model.cfg.seq_len, n_windows)
    windows = (windows if only is None else windows[only.cpu()]).to(next(model.parameters()).device)
    nll, ids, passes, captured = [], [], [], {layer: [] for layer in layers}
    hooks = [model.moe(layer).register_forward_pre_hook(lambda m, args, layer=layer: captured[layer].append(args[0]))
             for layer in layers]
    try:
        with eval_mode(model):
            for chunk in windows.split(batch_size):
                out = model(chunk[:, :-1], path=path)
                nll.append(F.cross_entropy(out.logits.transpose(1, 2), chunk[:, 1:], reduction="none").mean(1))
                ids.append([r.expert_ids if r is not None else None for r in out.routing])
                passes.append(out.passes * len(chunk))
    finally:
        for hook in hooks:
            hook.remove()
    per_layer = [None if layer[0] is None else torch.cat(layer) for layer in zip(*ids)]
    window_bpb = torch.cat(nll).cpu() / LN2
    return Evaluation(float(window_bpb.mean()), window_bpb, per_layer,
                      tuple(torch.cat(captured[layer]) for layer in layers), sum(passes) / max(len(windows), 1))


def ffn_inputs(model: GPT, tokens: torch.Tensor, layers: list[int], n_windows: int,
               path: int | None = None) -> tuple[torch.Tensor, ...]:
    """Per layer of ``layers``, the (windows, T, d) hidden states entering its MoE for evenly spaced
    windows of ``tokens``, all from one forward pass (:func:`evaluate`, which also gives
    the windows' BPB)."""
    return evaluate(model, tokens, n_windows, layers=layers, path=path).ffn_inputs


def forgetting_label(f: float) -> str:
    """none (< 2 %), mild (2–5 %), adjust (> 5 %): the seed's thresholds."""
    return "none" if f < 0.02 else "mild" if f <= 0.05 else "adjust"


def evaluate_domains(model: GPT, val: dict[str, torch.Tensor], n_windows: int) -> dict[str, Evaluation]:
    return {d: evaluate(model, t, n_windows) for d, t in val.items()}


def inference_cost(model: GPT, evals: dict[str, Evaluation]) -> dict:
    """What ``model`` spent per token on the windows of its evaluations ``evals``: its paths, how it
    runs them, model passes per token (1 on one path, P for the mixture, counted for the selection)
    and forward MFLOPs per token (one path's times the passes)."""
    windows = sum(len(e.window_bpb) for e in evals.values())
    passes = sum(e.passes * len(e.window_bpb) for e in evals.values()) / max(windows, 1)
    return {"paths": model.n_paths, "mode": model.inference if model.n_paths > 1 else "one path",
            "passes_per_token": passes, "mflops_per_token": model.flops_per_token() * passes / 1e6,
            "parameters": sum(p.numel() for p in model.parameters())}


def routing_stability(before: list[torch.Tensor | None], after: list[torch.Tensor | None]) -> list[float]:
    """Per layer, the share of tokens whose top-k expert *set* is the same before and after."""
    out = []
    for b, a in zip(before, after):
        if b is None or a is None:
            continue
        out.append(float((b.sort(-1).values == a.sort(-1).values).all(-1).double().mean()))
    return out


def routing_of(evals: dict[str, Evaluation], domains: list[str]) -> list[torch.Tensor | None]:
    """Per layer, the routed experts of every evaluated token of ``domains`` (None for dense)."""
    return [torch.cat(layer) if layer[0] is not None else None
            for layer in zip(*(evals[d].expert_ids for d in domains))]


def cycle_report(history: list[dict], name: str, new_domain: str, old_domains: list[str],
                 before: dict[str, Evaluation], after: dict[str, Evaluation], n_experts: list[int]) -> dict:
    """Everything ``evaluate`` writes for one cycle.

    history: earlier R-matrix rows ``{"name", "bpb": {domain: bpb}}``, oldest first (the last one is
    the checkpoint this cycle started from). A row holds the domains known when it was evaluated; the
    start row gains the ones first evaluated now (``before``), so R[i-1][i] is in the matrix.
    """
    bpb_before = {d: e.bpb for d, e in before.items()}
    bpb_after = {d: e.bpb for d, e in after.items()}
    start = {"name": history[-1]["name"], "bpb": {**bpb_before, **history[-1]["bpb"]}}
    rows = history[:-1] + [start, {"name": name, "bpb": bpb_after}]
    forgetting = {d: (bpb_after[d] - bpb_before[d]) / bpb_before[d] for d in old_domains}
    best = {d: min(r["bpb"][d] for r in rows[:-1] if d in r["bpb"]) for d in old_domains}
    forgetting_best = {d: (bpb_after[d] - best[d]) / best[d] for d in old_domains}
    stab_before, stab_after = (routing_of(ev, old_domains) for ev in (before, after))
    stability = routing_stability(stab_before, stab_after)
    usage = {d: e.expert_ids for d, e in after.items()}
    layers = metrics.specialization(usage, n_experts) if stab_after and stab_after[0] is not None else []
    return {
        "name": name,
        "domain": new_domain,
        "old_domains": old_domains,
        "history": rows,
        "bpb_before": bpb_before,
        "bpb": bpb_after,
        "forgetting": forgetting,
        "forgetting_label": {d: forgetting_label(f) for d, f in forgetting.items()},
        "forgetting_vs_best": forgetting_best,
        "avg_forgetting": sum(forgetting.values()) / len(forgetting),
        "worst_forgetting": max(forgetting.values()),
        "absorption": bpb_before[new_domain] - bpb_after[new_domain],
        # Mean BPB change on old domains (+ = improved): backward transfer of this cycle.
        "backward_transfer": sum(bpb_before[d] - bpb_after[d] for d in old_domains) / len(old_domains),
        # How far earlier learning got the new domain below 8 bits (an untrained byte model).
        "forward_transfer": 8.0 - bpb_before[new_domain],
        "routing_stability": stability,
        "routing_stability_mean": sum(stability) / len(stability) if stability else None,
        "experts_per_layer": n_experts,
        "eff_k": [layer["eff_k"] for layer in layers],
        "usage": layers,
    }
