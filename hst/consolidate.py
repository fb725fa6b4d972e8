"""Targeted consolidation (seed §6): finetune one expert on its coreset with everything else frozen,
then move that expert's key (EMA) toward the new data routed to it; and the consolidation job of a
cycle (:func:`load_job`, :func:`run_job`, :func:`save_job`), shared by the `consolidate` stage and
the flow's mapped per-expert tasks.

An expert is a (layer, expert id) pair: ids at different layers are unrelated experts, since each
layer's keys live in that layer's own hidden-state space.
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch

from hst import checkpoint, coreset, cycle, sampler
from hst.config import CycleConfig, ModelConfig, TrainConfig
from hst.io import write_csv, write_json
from hst.model import GPT
from hst.params import check_cycle_mode
from hst.router import KeyRouter
from hst.train import evaluate, train


@contextmanager
def only_trainable(model: GPT, experts: list[tuple[int, int]], also: list[torch.nn.Parameter] = ()):
    """Freeze every parameter except those of the ``(layer, expert)`` pairs and ``also``; restore the flags after."""
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in [q for layer, expert in experts for q in model.moe(layer).experts[expert].parameters()] + list(also):
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def ffn_inputs(model: GPT, tokens: torch.Tensor, layers: list[int], n_windows: int) -> tuple[torch.Tensor, ...]:
    """Per layer of ``layers``, the (windows, T, d) hidden states entering its MoE for evenly spaced
    windows of ``tokens``, all from one forward pass (:func:`hst.train.evaluate`, which also gives
    the windows' BPB)."""
    return evaluate(model, tokens, n_windows, layers=layers).ffn_inputs


def consolidate_expert(model: GPT, layer: int, expert: int, coreset: torch.Tensor,
                       new: torch.Tensor, cfg: TrainConfig, key_windows: int = 16) -> dict:
    """Finetune ``(layer, expert)`` on ``coreset`` tokens, then EMA its key toward the hidden states
    of the ``new`` tokens that route to it. Every other parameter and buffer stays bit-identical.
    A model with growth paths trains on its base path (path 0), the one its shared experts serve on
    every path.

    Returns the training curves.
    """
    cfg = dataclasses.replace(cfg, domains=("coreset",), update_keys=False)
    with only_trainable(model, [(layer, expert)]), model.on_path(0):
        curves = train(model, cfg, {"coreset": coreset}, {}, desc=f"consolidate L{layer}/E{expert}")
        ema_key(model, layer, expert, new, key_windows)
    return curves


def ema_key(model: GPT, layer: int, expert: int, new: torch.Tensor, key_windows: int = 16, path: int = 0) -> None:
    """One EMA step of the expert's key toward the new tokens routed to it on ``path`` (key router only;
    call it with the model on that path)."""
    router = model.moe(layer).router
    if isinstance(router, KeyRouter):
        (x,) = ffn_inputs(model, new, [layer], key_windows)
        mine = (router(x, path).expert_ids == expert).any(-1)
        x = x.reshape(-1, x.shape[-1])  # (windows·T, d), the order routing flattens to
        if mine.any():
            router.update_keys(x[mine], torch.full((int(mine.sum()), 1), expert))


def consolidate_experts(model: GPT, sets: list[tuple[int, int, torch.Tensor, torch.Tensor]],
                        cfg: TrainConfig, joint: bool = False) -> list[dict]:
    """Consolidate several experts one after the other; ``sets`` holds ``(layer, expert, coreset,
    new)`` token streams in the order to train them, so each expert trains on the hidden states its
    predecessors' updates produce. The step budget ``cfg.steps`` is split evenly across the experts.

    ``joint=True`` is the alternative we measured and rejected (docs/decisions.md): all experts
    unfrozen together and trained for the whole budget on the union of their coresets.
    Returns the training curves, one per trained set.
    """
    if joint:
        jcfg = dataclasses.replace(cfg, domains=tuple(f"{l}/{e}" for l, e, _, _ in sets), update_keys=False)
        with only_trainable(model, [(l, e) for l, e, _, _ in sets]), model.on_path(0):
            curves = train(model, jcfg, {f"{l}/{e}": c for l, e, c, _ in sets}, {}, desc="consolidate jointly")
            for layer, expert, _, new in sets:
                ema_key(model, layer, expert, new)
        return [curves]
    return [consolidate_expert(model, layer, expert, coreset, new, expert_budget(cfg, i, len(sets)))
            for i, (layer, expert, coreset, new) in enumerate(sets)]


def expert_budget(cfg: TrainConfig, i: int, n: int) -> TrainConfig:
    """The training config of the ``i``-th of ``n`` experts: an even share of the steps, its own seed."""
    steps = max(cfg.steps // max(n, 1), 1)
    return dataclasses.replace(cfg, steps=steps, warmup_steps=min(cfg.warmup_steps, steps), seed=cfg.seed + i)


def consolidate_part(model: GPT, i: int, n: int, one_set: tuple[int, int, torch.Tensor, torch.Tensor],
                     cfg: TrainConfig) -> tuple[dict, dict]:
    """The parallel path's unit of work: consolidate the ``i``-th of ``n`` sets on a private copy of
    ``model`` (left untouched); return that expert's new state (see :func:`expert_state`) and its curves.
    Parts of one start model are independent, so they can run in any order or at once."""
    layer, expert, coreset, new = one_set
    work = copy.deepcopy(model)
    curves = consolidate_expert(work, layer, expert, coreset, new, expert_budget(cfg, i, n))
    return expert_state(work, layer, expert), curves


def consolidate_parallel(model: GPT, sets: list[tuple[int, int, torch.Tensor, torch.Tensor]],
                         cfg: TrainConfig) -> list[dict]:
    """Every expert consolidated from the same start ``model`` (:func:`consolidate_part`), then merged
    into it; in-process equivalent of the flow's mapped tasks. Returns the curves, one per set."""
    parts = [consolidate_part(model, i, len(sets), s, cfg) for i, s in enumerate(sets)]
    merge_expert_states(model, [state for state, _ in parts])
    return [curves for _, curves in parts]


def expert_state(model: GPT, layer: int, expert: int) -> dict:
    """Everything consolidating ``(layer, expert)`` may change: the expert's tensors and its key."""
    moe = model.moe(layer)
    keys = getattr(moe.router, "keys", None)
    return {"layer": layer, "expert": expert,
            "weights": {k: v.detach().clone() for k, v in moe.experts[expert].state_dict().items()},
            "key": None if keys is None else keys[expert].clone()}


def merge_expert_states(model: GPT, states: list[dict]) -> None:
    """Write each state into its own expert; they touch disjoint tensors, so the order is irrelevant."""
    with torch.no_grad():
        for s in states:
            moe = model.moe(s["layer"])
            moe.experts[s["expert"]].load_state_dict(s["weights"])
            if s["key"] is not None:
                moe.router.keys[s["expert"]] = s["key"]


class Job(NamedTuple):
    """A cycle's consolidation, loaded."""
    cfg: CycleConfig
    tcfg: TrainConfig
    model: GPT  # the cycle's start model; consolidated in place
    meta: dict
    selection: list[dict]  # the coreset folder's selection entries, in training order
    sets: list[tuple]  # per entry, as hst.coreset.read_sets returns them
    new_ids: list[str]  # record ids of the buffer, consumed by this cycle


def load_job(cfg: CycleConfig, tcfg: TrainConfig, expect: ModelConfig, start: str | Path, coresets: str | Path,
             buffer: str | Path) -> Job:
    """The start checkpoint (checked against ``expect``), the coreset sets and the new records."""
    model, meta = checkpoint.load(start, expect)
    check_cycle_mode(cfg.mode, model.cfg.ffn)
    new = sampler.load_records(buffer)
    selection, sets = coreset.read_sets(coresets, new, per_expert=cycle.coresets(cfg) == "experts")
    return Job(cfg, tcfg, model, meta, selection, sets, new["record_id"].to_pylist())


def run_job(job: Job) -> list[dict]:
    """Train ``job.model`` in place as the mode says; return the curves, one per set."""
    todo = cycle.consolidation(job.cfg)
    if todo == "none":
        return []
    if todo == "model":
        ((_, _, tokens, _),) = job.sets
        return [train(job.model, dataclasses.replace(job.tcfg, domains=("all",)), {"all": tokens}, {}, desc="finetune")]
    if todo == "experts_parallel":
        return consolidate_parallel(job.model, job.sets, job.tcfg)
    return consolidate_experts(job.model, job.sets, job.tcfg)


def save_job(job: Job, curves: list[dict], out: str | Path, metrics: str | Path, curves_csv: str | Path) -> None:
    """The consolidated checkpoint (the buffer's records marked consumed), its loss curve and metrics."""
    rows, trained = [], []
    for entry, c in zip(job.selection, curves):
        trained.append({**entry, "steps": len(c["train"]), "final_train_bpb": c["train"][-1]["train_bpb"]})
        rows += [{"step": len(rows) + 1, "train_bpb": r["train_bpb"], "coreset": entry["name"]} for r in c["train"]]
    meta = {**job.meta, "stage": "consolidate", "consumed": sorted(set(job.meta.get("consumed", [])) | set(job.new_ids))}
    checkpoint.save(out, job.model, meta)
    write_csv(curves_csv, rows, columns=["step", "train_bpb", "coreset"])
    write_json(metrics, {"mode": job.cfg.mode, "consolidation": job.cfg.consolidation,
                         "experts_trained": len(trained) if cycle.consolidation(job.cfg).startswith("experts") else 0,
                         "tokens": len(rows) * job.tcfg.batch_size * job.model.cfg.seq_len, "sets": trained})
