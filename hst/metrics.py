"""Routing metrics: expert usage, Eff_K, how differently domains route (TV, Jaccard, ITJD), and
RMI, the mutual information between domain and routed expert.

Pure functions over routing tables (``expert_ids`` of shape (N, k) per layer); usage counts every
one of a token's routed slots that runs an expert (Top-Any's skipped slots do not count).
"""

from __future__ import annotations

import itertools
import math

import torch

from hst.router import SKIPPED


def slot_counts(expert_ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(E,) how many routed slots ran each expert."""
    ids = expert_ids.reshape(-1)
    return torch.bincount(ids[ids != SKIPPED], minlength=n_experts)


def usage(expert_ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(E,) share of routed slots that went to each expert (sums to 1)."""
    counts = slot_counts(expert_ids, n_experts).double()
    return counts / counts.sum()


def experts_per_token(expert_ids: torch.Tensor) -> float:
    """Mean number of experts a token runs: k for top-k, fewer for Top-Any with a floor."""
    return float((expert_ids != SKIPPED).sum(-1).double().mean())


def eff_k(p: torch.Tensor) -> float:
    """exp of the Shannon entropy (nats) of a usage distribution: 1 = collapse, E = uniform."""
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


def cover_set(p: torch.Tensor, mass: float) -> set[int]:
    """Smallest set of experts whose usage adds up to at least ``mass``."""
    order = p.argsort(descending=True, stable=True)
    cum = p[order].cumsum(0)
    n = int((cum < mass - 1e-12).sum()) + 1
    return set(order[:n].tolist())


def jaccard_distance(a: set, b: set) -> float:
    return 1.0 - len(a & b) / len(a | b) if a | b else 0.0


def itjd(usage_by_domain: dict[str, torch.Tensor], mass: float = 0.9) -> float:
    """Mean pairwise Jaccard distance between the domains' expert sets covering ``mass`` of their usage."""
    sets = [cover_set(p, mass) for p in usage_by_domain.values()]
    pairs = list(itertools.combinations(sets, 2))
    return sum(jaccard_distance(a, b) for a, b in pairs) / len(pairs) if pairs else 0.0


def rmi(ids_by_domain: dict[str, torch.Tensor], n_experts: int) -> float:
    """I(domain; routed expert) / H(domain), over all routed slots: 0 = routing ignores the
    domain, 1 = the expert determines the domain."""
    joint = torch.stack([slot_counts(ids, n_experts).double()
                         for ids in ids_by_domain.values()])  # (D, E) slot counts
    joint = joint / joint.sum()
    pd, pe = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    nz = joint > 0
    mi = float((joint[nz] * (joint[nz] / (pd @ pe)[nz]).log()).sum())
    h = float(-(pd[pd > 0] * pd[pd > 0].log()).sum())
    return mi / h if h > 0 else 0.0


def specialization(ids_by_domain: dict[str, list[torch.Tensor]], n_experts: list[int],
                   cover: float = 0.8) -> list[dict]:
    """Per layer: usage overall and per domain, Eff_K, experts per token, and pairwise TV / Jaccard
    of cover sets."""
    layers = []
    for layer, n in enumerate(n_experts):
        per_domain = {d: usage(ids[layer], n) for d, ids in ids_by_domain.items()}
        overall = usage(torch.cat([ids[layer] for ids in ids_by_domain.values()]), n)
        pairs = {}
        for a, b in itertools.combinations(per_domain, 2):
            pairs[f"{a}|{b}"] = {
                "tv": total_variation(per_domain[a], per_domain[b]),
                "jaccard": jaccard_distance(cover_set(per_domain[a], cover), cover_set(per_domain[b], cover)),
            }
        layers.append({
            "layer": layer,
            "usage": overall.tolist(),
            "max_share": float(overall.max()),
            "eff_k": eff_k(overall),
            "experts_per_token": experts_per_token(torch.cat([ids[layer] for ids in ids_by_domain.values()])),
            "domains": {d: {"usage": p.tolist(), "eff_k": eff_k(p),
                            "cover_set": sorted(cover_set(p, cover))} for d, p in per_domain.items()},
            "pairs": pairs,
            "itjd": itjd(per_domain),
            "rmi": rmi({d: ids[layer] for d, ids in ids_by_domain.items()}, n),
        })
    return layers


def routing_curve(ids_by_domain: dict[str, list[torch.Tensor]], n_experts: list[int]) -> dict[str, float]:
    """Per-layer ITJD, RMI, Eff_K and experts per token as flat training-curve columns
    (``itjd.layer0``, ...)."""
    return {f"{name}.layer{r['layer']}": r[name] for r in specialization(ids_by_domain, n_experts)
            for name in ("itjd", "rmi", "eff_k", "experts_per_token")}
