"""Targeted consolidation (seed §6): finetune one expert on its coreset with everything else frozen,
then move that expert's key (EMA) toward the new data routed to it.

An expert is a (layer, expert id) pair: ids at different layers are unrelated experts, since each
layer's keys live in that layer's own hidden-state space.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import torch

from hst.config import TrainConfig
from hst.model import GPT
from hst.router import KeyRouter
from hst.train import eval_windows, train


@contextmanager
def only_trainable(model: GPT, experts: list[tuple[int, int]]):
    """Freeze every parameter except those of the ``(layer, expert)`` pairs; restore the flags after."""
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for layer, expert in experts:
        for p in model.moe(layer).experts[expert].parameters():
            p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


@torch.no_grad()
def ffn_inputs(model: GPT, tokens: torch.Tensor, layer: int, n_windows: int) -> torch.Tensor:
    """(N, d) hidden states entering ``layer``'s MoE for evenly spaced windows of ``tokens``."""
    captured = []
    hook = model.moe(layer).register_forward_pre_hook(lambda m, args: captured.append(args[0].reshape(-1, args[0].shape[-1])))
    was_training = model.training
    model.eval()
    try:
        model(eval_windows(tokens, model.cfg.seq_len, n_windows)[:, :-1])
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(captured)


def consolidate_expert(model: GPT, layer: int, expert: int, coreset: torch.Tensor,
                       new: torch.Tensor, cfg: TrainConfig, key_windows: int = 16) -> dict:
    """Finetune ``(layer, expert)`` on ``coreset`` tokens, then EMA its key toward the hidden states
    of the ``new`` tokens that route to it. Every other parameter and buffer stays bit-identical.

    Returns the training curves.
    """
    cfg = dataclasses.replace(cfg, domains=("coreset",), update_keys=False)
    with only_trainable(model, [(layer, expert)]):
        curves = train(model, cfg, {"coreset": coreset}, {}, desc=f"consolidate L{layer}/E{expert}")
    router = model.moe(layer).router
    if isinstance(router, KeyRouter):
        x = ffn_inputs(model, new, layer, key_windows)
        mine = (router(x).expert_ids == expert).any(-1)
        if mine.any():
            router.update_keys(x[mine], torch.full((int(mine.sum()), 1), expert))
    return curves
