"""The promotion gate and the alarms of a learn–consolidate cycle, read off its evaluation report
(``hst.evaluation.cycle_report``).

A cycle's checkpoint becomes the champion — the model the next cycle starts from and ``collect``
serves — only if it forgot at most ``max_forgetting`` on every old domain and kept at least
``min_routing_stability`` of the old domains' routing. Alarms are the same test at the seed's fixed
thresholds (> 5 % forgetting is "adjust", < 90 % routing stability is drift), whatever the gate says.
"""

from __future__ import annotations

import math

from hst.config import GateConfig

ALARMS = GateConfig(max_forgetting=0.05, min_routing_stability=0.90)


def gate_failures(report: dict, cfg: GateConfig) -> list[str]:
    """Why the cycle fails ``cfg`` (one line per reason); empty when it passes.

    Routing stability does not apply to a dense model (``routing_stability_mean`` is None). A metric
    that is not a finite number (NaN from a diverged model, a hand-edited report) always fails.
    """
    reasons = [f"forgetting on {d} {f:+.2%} > {cfg.max_forgetting:.2%}" if _finite(f) else f"forgetting on {d} is {f!r}"
               for d, f in sorted(report["forgetting"].items()) if not _finite(f) or f > cfg.max_forgetting]
    stability = report.get("routing_stability_mean")
    if stability is not None and not _finite(stability):
        reasons.append(f"routing stability is {stability!r}")
    elif stability is not None and stability < cfg.min_routing_stability:
        reasons.append(f"routing stability {stability:.2%} < {cfg.min_routing_stability:.2%}")
    return reasons


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def alarms(report: dict) -> list[str]:
    """The seed's alarms: any forgetting above 5 %, routing stability below 90 %."""
    return gate_failures(report, ALARMS)
