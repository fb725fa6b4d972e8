"""Targeted consolidation (seed §6): finetune one expert on its coreset with everything else frozen,
then move that expert's key (EMA) toward the new data routed to it (:func:`consolidate_experts`: a
cycle's selected experts, one after another; :func:`hst.cycle.consolidate` builds their coresets).

An expert is a (layer, expert id) pair: ids at different layers are unrelated experts, since each
layer's keys live in that layer's own hidden-state space.
"""

from __future__ import annotations

import dataclasses

import torch

from hst.config import TrainConfig
from hst.evaluation import ffn_inputs
from hst.model import GPT
from hst.router import KeyRouter
from hst.train import only_trainable, train


def consolidate_expert(model: GPT, layer: int, expert: int, coreset: torch.Tensor,
                       new: torch.Tensor, cfg: TrainConfig, key_windows: int = 16) -> dict:
    """Finetune ``(layer, expert)`` on ``coreset`` tokens, then EMA its key toward the hidden states
    of the ``new`` tokens that route to it. Every other parameter and buffer stays bit-identical.
    A model with growth paths trains on its base path (path 0), the one its shared experts serve on
    every path.

    Returns the training curves.
    """
    cfg = dataclasses.replace(cfg, domains=("coreset",), update_keys=False)
    with only_trainable(model, [(layer, expert)]):
        curves = train(model, cfg, {"coreset": coreset}, {}, desc=f"consolidate L{layer}/E{expert}", path=0)
    ema_key(model, layer, expert, new, key_windows)
    return curves


def ema_key(model: GPT, layer: int, expert: int, new: torch.Tensor, key_windows: int = 16, path: int = 0) -> None:
    """One EMA step of the expert's key toward the new tokens routed to it on ``path`` (key router only)."""
    router = model.moe(layer).router
    if isinstance(router, KeyRouter):
        (x,) = ffn_inputs(model, new, [layer], key_windows, path)
        mine = (router(x, path).expert_ids == expert).any(-1)
        x = x.reshape(-1, x.shape[-1])  # (windows·T, d), the order routing flattens to
        if mine.any():
            router.update_keys(x[mine], torch.full((int(mine.sum()), 1), expert))


def consolidate_experts(model: GPT, sets: list[tuple[int, int, torch.Tensor, torch.Tensor]],
                        cfg: TrainConfig) -> list[dict]:
    """Consolidate several experts one after the other; ``sets`` holds ``(layer, expert, coreset,
    new)`` token streams in the order to train them, so each expert trains on the hidden states its
    predecessors' updates produce. The step budget ``cfg.steps`` is split evenly across the experts.
    Returns the training curves, one per set."""
    return [consolidate_expert(model, layer, expert, coreset, new, expert_budget(cfg, i, len(sets)))
            for i, (layer, expert, coreset, new) in enumerate(sets)]


def expert_budget(cfg: TrainConfig, i: int, n: int) -> TrainConfig:
    """The training config of the ``i``-th of ``n`` experts: an even share of the steps, its own seed."""
    steps = max(cfg.steps // max(n, 1), 1)
    return dataclasses.replace(cfg, steps=steps, warmup_steps=min(cfg.warmup_steps, steps), seed=cfg.seed + i)
