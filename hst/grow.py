"""Expert growth as the seed (§3.3) writes it: trigger on novel tokens, key at the mean of the
unrouted hidden states, copy-nearest (or random) init, then train only the new experts.

``FINDINGS.md`` shows this recipe is not enough (raw max-cosine novelty does not separate a new
domain, and a key at the mean hidden state captures old tokens); making growth work is a separate
issue. This module implements the recipe faithfully and reports its statistics.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from hst.config import GrowConfig, TrainConfig
from hst.consolidate import ffn_inputs, only_trainable
from hst.model import GPT
from hst.train import train


def batch_novelty(novel_share: list[float], n_tokens: list[int], batch_records: int) -> list[float]:
    """Token-weighted share of novel tokens per consecutive batch of ``batch_records`` records."""
    out = []
    for i in range(0, len(novel_share), batch_records):
        s, n = novel_share[i:i + batch_records], n_tokens[i:i + batch_records]
        out.append(sum(a * b for a, b in zip(s, n)) / sum(n))
    return out


def triggered(batch_shares: list[float], p: float, m: int) -> bool:
    """True when ``m`` consecutive batches have a novel share above ``p``."""
    run = 0
    for share in batch_shares:
        run = run + 1 if share > p else 0
        if run >= m:
            return True
    return False


def unrouted_states(model: GPT, tokens: torch.Tensor, layer: int, n_windows: int) -> torch.Tensor:
    """Hidden states at ``layer`` whose best key similarity is below the novelty threshold."""
    x = ffn_inputs(model, tokens, layer, n_windows)
    return x[model.moe(layer).router(x).needs_new]


def grow(model: GPT, layers: list[int], tokens: torch.Tensor, cfg: GrowConfig, train_cfg: TrainConfig,
         n_windows: int = 32) -> tuple[list[tuple[int, int]], dict]:
    """Add one expert to each of ``layers`` (key = normalized mean of its unrouted states) and train
    only the new experts on ``tokens``. Returns the new ``(layer, expert)`` pairs and the curves."""
    added = []
    for layer in layers:
        states = unrouted_states(model, tokens, layer, n_windows)
        if len(states) == 0:
            continue
        key = F.normalize(states.float().mean(0), dim=-1)
        added.append((layer, model.add_expert(layer, key, cfg.init)))
    curves = {}
    if added and cfg.steps > 0:
        tcfg = dataclasses.replace(train_cfg, domains=("novel",), steps=cfg.steps, update_keys=False,
                                   warmup_steps=min(train_cfg.warmup_steps, cfg.steps))
        with only_trainable(model, added):
            curves = train(model, tcfg, {"novel": tokens}, {}, desc="grow")
    return added, curves
