"""Novelty detection: when does incoming data call for a new expert, and which tokens may use it.

Two levels, measured in ``docs/decisions.md`` (raw max-cosine and Mahalanobis scores on hidden
states did not separate a new domain; see ``FINDINGS.md``):

- **Record level — surprise.** A record's novelty score is its BPB under the current model (the
  Smart Sampler logs it as ``bpb``). A record is novel when its BPB exceeds a high quantile of the
  BPB of held-in records (the cycle's index of learned domains); growth triggers when ``M``
  consecutive batches of records have more than a share ``p`` of novel ones.
- **Token level — a growth gate.** A new expert gets a linear gate (Fisher discriminant between
  held-in and novel hidden states, on the router's features) whose bias is calibrated so that only
  a share ``fpr`` of held-in tokens pass; :func:`hst.router.gate_open` applies it to the causal
  running mean of the score along each sequence (which starts at the held-in mean).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from hst.config import GrowConfig
from hst.router import GATE_PRIOR_TOKENS, causal_mean


def auroc(negative: list[float], positive: list[float]) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    neg, pos = torch.tensor(negative, dtype=torch.float64), torch.tensor(positive, dtype=torch.float64)
    if len(neg) == 0 or len(pos) == 0:
        raise ValueError("auroc needs at least one negative and one positive score")
    greater = (pos[:, None] > neg[None]).double().sum() + 0.5 * (pos[:, None] == neg[None]).double().sum()
    return float(greater / (len(pos) * len(neg)))


def threshold(reference: list[float], quantile: float) -> float:
    """The novelty threshold: ``quantile`` of the held-in reference scores."""
    if not reference:
        raise ValueError("no held-in reference scores to set a novelty threshold from")
    return float(torch.quantile(torch.tensor(reference, dtype=torch.float64), quantile))


def batch_shares(novel: list[bool], batch_records: int) -> list[float]:
    """Share of novel records in each consecutive batch of ``batch_records`` (the last may be short)."""
    return [sum(novel[i:i + batch_records]) / len(novel[i:i + batch_records])
            for i in range(0, len(novel), batch_records)]


def first_trigger(shares: list[float], p: float, m: int) -> int | None:
    """Index of the batch that completes ``m`` consecutive batches with share above ``p``, or None."""
    run = 0
    for i, share in enumerate(shares):
        run = run + 1 if share > p else 0
        if run >= m:
            return i
    return None


class Detection(NamedTuple):
    """The growth trigger's view of a record stream."""
    novel: list[bool]  # per record: score above the threshold
    shares: list[float]  # per batch of cfg.batch_records: share of novel records
    trigger: int | None  # batch index where growth triggers, None if it does not
    records_until_detection: int | None  # records read when it triggers


def detect(scores: list[float], limit: float, cfg: GrowConfig) -> Detection:
    """The growth decision on a stream of record scores (BPB): ``cfg.min_batches`` consecutive batches
    of ``cfg.batch_records`` with more than ``cfg.novel_share`` records above ``limit``."""
    novel = [s > limit for s in scores]
    shares = batch_shares(novel, cfg.batch_records)
    trigger = first_trigger(shares, cfg.novel_share, cfg.min_batches)
    until = None if trigger is None else min((trigger + 1) * cfg.batch_records, len(novel))
    return Detection(novel, shares, trigger, until)


def fit_gate(held_in: list[torch.Tensor], novel: torch.Tensor, fpr: float,
             shrinkage: float = 1e-3) -> tuple[torch.Tensor, float, float]:
    """A gate ``(w, shift, b)`` for a new expert (see :func:`hst.router.gate_open`) from router
    features of shape (windows, T, d): ``held_in`` one such tensor per held-in source (learned domain).

    ``w`` is the Fisher discriminant direction (pooled covariance, shrunk toward its mean variance
    by ``shrinkage`` so it is invertible); ``shift`` is the held-in tokens' mean score; ``b`` puts at
    most the share ``fpr`` of *every* source's causal running-mean scores above zero. A pooled
    quantile let a gate's false positives concentrate on the one learned domain closest to the new
    data (measured: a man-pages gate at 3 % pooled passed enough python tokens to cost python 9.7 %).
    """
    d = novel.shape[-1]
    old, new = torch.cat([h.reshape(-1, d) for h in held_in]).double(), novel.reshape(-1, d).double()
    cov = (torch.cov(old.T) + torch.cov(new.T)) / 2
    cov += shrinkage * cov.diagonal().mean() * torch.eye(d, dtype=cov.dtype)
    w = torch.linalg.solve(cov, new.mean(0) - old.mean(0))
    shift = float(old.mean(0) @ w)
    top = max(float(torch.quantile(causal_mean(h.double() @ w - shift, GATE_PRIOR_TOKENS).flatten(), 1 - fpr))
              for h in held_in)
    return w.float(), shift, -top
