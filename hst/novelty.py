"""Novelty detection: when does incoming data call for a new expert, and which tokens may use it.

Two levels, measured in ``docs/decisions.md`` (raw max-cosine and Mahalanobis scores on hidden
states did not separate a new domain; see ``docs/prototype.md``):

- **Record level — surprise.** A record's novelty score is its BPB under the current model (the
  Smart Sampler logs it as ``bpb``). A record is novel when its BPB exceeds a high quantile of the
  BPB of held-in records (the cycle's index of learned domains); growth triggers when ``M``
  consecutive batches of records have more than a share ``p`` of novel ones.
- **Token level — a growth gate.** New experts get a gate scoring each token's router features —
  a small MLP trained to tell novel from held-in tokens, or a linear Fisher discriminant — whose
  bias is calibrated so that only a share ``fpr`` of every held-in source's tokens pass;
  :func:`hst.router.gate_open` applies it to the causal running mean of the score along each
  sequence (which starts at the held-in mean).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from hst.config import GrowConfig
from hst.router import GATE_PRIOR_TOKENS, Gate, causal_mean, gate_scores


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


# Training of an MLP gate's scorer (measured on the default cycles, docs/decisions.md).
GATE_STEPS = 600
GATE_BATCH = 4096
GATE_LR = 1e-3
GATE_WEIGHT_DECAY = 1e-4


def fit_gate(held_in: list[torch.Tensor], novel: torch.Tensor, fpr: float, hidden: int = 0, seed: int = 0,
             shrinkage: float = 1e-3) -> Gate:
    """A :class:`~hst.router.Gate` for new experts from router features of shape (windows, T, d):
    ``held_in`` one such tensor per held-in source (learned domain).

    ``hidden = 0``: the linear Fisher discriminant (pooled covariance, shrunk toward its mean
    variance by ``shrinkage`` so it is invertible). ``hidden > 0``: an MLP of that width trained
    (seeded by ``seed``) as a logistic classifier of single tokens, novel against held-in, each
    source weighted equally; it separates what one direction cannot (man pages from python: 4–17 %
    of new tokens passed a Fisher gate, 33–55 % an MLP gate at the same false-positive budget).
    ``shift`` is the held-in tokens' mean score; ``b`` puts at most the share ``fpr`` of *every*
    source's causal running-mean scores above zero. A pooled quantile let a gate's false positives
    concentrate on the one learned domain closest to the new data (measured: a man-pages gate at
    3 % pooled passed enough python tokens to cost python 9.7 %).
    """
    d = novel.shape[-1]
    new = novel.reshape(-1, d)
    if hidden:
        gate = Gate(torch.zeros(d), *_fit_mlp([h.reshape(-1, d) for h in held_in], new, hidden, seed),
                    torch.tensor(0.0), torch.tensor(0.0))
    else:
        old, new = torch.cat([h.reshape(-1, d) for h in held_in]).double(), new.double()
        cov = (torch.cov(old.T) + torch.cov(new.T)) / 2
        cov += shrinkage * cov.diagonal().mean() * torch.eye(d, dtype=cov.dtype)
        gate = Gate.linear(torch.linalg.solve(cov, new.mean(0) - old.mean(0)).float(), 0.0, 0.0)
    scores = [gate_scores(h, gate).double() for h in held_in]  # before the shift: ``gate`` has shift 0 here
    shift = float(torch.cat(scores).mean())
    return gate._replace(shift=torch.tensor(shift), b=gate_bias([s - shift for s in scores], fpr))


def gate_bias(scores: list[torch.Tensor], fpr: float) -> torch.Tensor:
    """The bias ``b`` that opens a gate for at most the share ``fpr`` of every held-in source's
    tokens, given each source's (windows, T) shifted gate scores (:func:`~hst.router.gate_scores`)."""
    return torch.tensor(-max(float(torch.quantile(causal_mean(s.double(), GATE_PRIOR_TOKENS).flatten(), 1 - fpr))
                             for s in scores))


def _fit_mlp(held_in: list[torch.Tensor], novel: torch.Tensor, hidden: int,
             seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u, c, v) of a one-hidden-layer GELU scorer, held-in (each source weighted equally) vs novel
    tokens; the inputs' standardisation is folded into ``u`` and ``c``."""
    x = torch.cat([novel, *held_in]).float()
    y = torch.cat([torch.ones(len(novel)), torch.zeros(len(x) - len(novel))])
    weight = torch.cat([torch.ones(len(novel))] + [torch.full((len(h),), len(novel) / len(h) / len(held_in))
                                                    for h in held_in])
    mean, std = x.mean(0), x.std(0) + 1e-6
    x = (x - mean) / std  # once, not per batch: the same values, bit for bit
    gen = torch.Generator().manual_seed(seed)
    bound = lambda fan_in: fan_in ** -0.5  # noqa: E731  (nn.Linear's init, from the seeded generator)
    params = [torch.empty(shape).uniform_(-bound(fan_in), bound(fan_in), generator=gen).requires_grad_()
              for shape, fan_in in [((hidden, x.shape[1]), x.shape[1]), ((hidden,), x.shape[1]),
                                    ((hidden,), hidden), ((), hidden)]]
    w1, b1, w2, b2 = params
    opt = torch.optim.Adam(params, GATE_LR, weight_decay=GATE_WEIGHT_DECAY)
    with torch.enable_grad():
        for _ in range(GATE_STEPS):
            i = torch.randint(len(x), (GATE_BATCH,), generator=gen)
            logits = F.gelu(x[i] @ w1.T + b1) @ w2 + b2
            loss = (F.binary_cross_entropy_with_logits(logits, y[i], reduction="none") * weight[i]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    u = w1.detach() / std  # b2 is a constant: the gate's shift absorbs it
    return u, b1.detach() - u @ mean, w2.detach()
