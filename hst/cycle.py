"""What a learn–consolidate cycle does: the one place that combines ``cycle.mode``,
``cycle.consolidation``, ``grow.decide``, ``grow.select`` and ``grow.enabled``.

A cycle runs the same stages in every mode (``collect → coreset → consolidate → grow → evaluate →
gate``). The three that train ask this module what to do with the cycle's records — each passing
only the params sections it reads, so a stage re-runs only when its own keys change — and act on the
answer instead of combining the params themselves; the flow asks it whether to map consolidation
over workers. In the default (mode ``grow``, paths, novelty deciding) `coreset` and `consolidate`
train nothing: a known path is consolidated by `grow` on the records its sketch explains
(:func:`hst.grow.learn`), in the process that grows a path from the rest, so one step budget is
split between the two in one place.
"""

from __future__ import annotations

from hst.config import CycleConfig, GrowConfig

# What `coreset` writes, by cycle.mode: one set per expert primary for enough new records, the new
# records, new and old records at cycle.new_old_ratio, or nothing.
CORESETS = {"experts": "experts", "full": "new", "full_replay": "replay", "grow": "none"}


def coresets(cycle: CycleConfig) -> str:
    """What `coreset` writes: "experts", "new", "replay" or "none" (:data:`CORESETS`)."""
    return CORESETS[cycle.mode]


def consolidation(cycle: CycleConfig) -> str:
    """What `consolidate` trains: "experts" (each selected expert on its coreset, one after another),
    "experts_parallel" (each from the cycle's start model, then merged; the flow maps them as tasks),
    "model" (every weight on the one set: the dense baselines) or "none" (the checkpoint passes on)."""
    if cycle.mode == "experts":
        return "experts_parallel" if cycle.consolidation == "parallel" else "experts"
    return "none" if cycle.mode == "grow" else "model"


def growth(cycle: CycleConfig, grow: GrowConfig, ffn: str) -> str:
    """What `grow` does on a model whose FFN is ``ffn``: "by_novelty" (a known path consolidates on the
    records its sketch explains, the rest grow a path), "all" (every cycle grows from all its records,
    a path or gated experts), "novel" (from the records the surprise detector finds novel, when it
    triggers) or "none" (growth needs HST's key router)."""
    if not grow.enabled or ffn != "key":
        return "none"
    if cycle.mode != "grow":
        return "novel"
    return "by_novelty" if grow.select == "posterior" and grow.decide == "novelty" else "all"
