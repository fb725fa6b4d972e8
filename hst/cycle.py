"""What a learn–consolidate cycle does with its records: the one place that combines ``cycle.mode``,
``grow.decide``, ``grow.select`` and ``grow.enabled``, and the work of the `learn` stage.

A cycle runs ``learned → collect → learn → evaluate → gate → track → build_index`` in every mode.
`learn` first consolidates what the mode asks (:func:`consolidate`: mode ``experts`` the experts the
new records route to, on their coresets; ``full``/``full_replay`` the whole model), then grows
(:func:`learn_growth`). In the default (mode ``grow``, paths, novelty deciding) the first part trains
nothing: a known path is consolidated by :func:`hst.grow.learn` on the records its sketch explains, in
the call that grows a path from the rest, so one step budget is split between the two in one place.
"""

from __future__ import annotations

import dataclasses

import pyarrow as pa

from hst import coreset, data, gates, grow, novelty, sampler
from hst.config import CycleConfig, GrowConfig, TrainConfig
from hst.consolidate import consolidate_experts
from hst.model import GPT
from hst.train import train

# The coresets a cycle consolidates on, by cycle.mode: one set per expert primary for enough new records, the new
# records, new and old records at cycle.new_old_ratio, or nothing.
CORESETS = {"experts": "experts", "full": "new", "full_replay": "replay", "grow": "none"}


def coresets(cycle: CycleConfig) -> str:
    """The sets :func:`consolidate` trains on: "experts", "new", "replay" or "none" (:data:`CORESETS`)."""
    return CORESETS[cycle.mode]


def consolidation(cycle: CycleConfig) -> str:
    """What :func:`consolidate` trains: "experts" (each selected expert on its coreset, one after
    another), "model" (every weight on the one set: the dense baselines) or "none"."""
    if cycle.mode == "experts":
        return "experts"
    return "none" if cycle.mode == "grow" else "model"


def growth(cycle: CycleConfig, gcfg: GrowConfig, ffn: str) -> str:
    """What :func:`learn_growth` does on a model whose FFN is ``ffn``: "by_novelty" (a known path consolidates on the
    records its sketch explains, the rest grow a path), "all" (every cycle grows from all its records,
    a path or gated experts), "novel" (from the records the surprise detector finds novel, when it
    triggers) or "none" (growth needs HST's key router)."""
    if not gcfg.enabled or ffn != "key":
        return "none"
    if cycle.mode != "grow":
        return "novel"
    return "by_novelty" if gcfg.select == "posterior" and gcfg.decide == "novelty" else "all"


def index_columns(cycle: CycleConfig, gcfg: GrowConfig, model: GPT) -> list[str] | None:
    """The columns of the expert index `learn` reads (None: all). Coresets route old records by their
    primary experts; growth reads the index's text for path 0's sketch at the first growth (samples of
    the model with generated replay), for the stored records of the paths novelty consolidates, and
    for the held-in reference of learned gates; the novelty threshold reads only the BPB."""
    if coresets(cycle) != "none":
        return None
    reads_text = held_in_text(gcfg, model) or growth(cycle, gcfg, model.cfg.ffn) == "by_novelty"
    return ["record_id", "text", "bpb", "source"] if reads_text else ["bpb"]


def held_in_text(gcfg: GrowConfig, model: GPT) -> bool:
    """Whether growing ``model`` reads the index's text as held-in reference: learned gates calibrate on
    it, and the first path sketches path 0 from it."""
    return gcfg.select == "gate" or not len(model.path_sketches)


def consolidate(model: GPT, new: pa.Table, index: pa.Table, cycle: CycleConfig,
                tcfg: TrainConfig) -> tuple[dict, list[dict]]:
    """Train ``model`` in place on the coresets the mode asks for (:func:`hst.coreset.sets`) of the
    ``new`` records and the ``index``'s old ones: each selected expert alone, one after another, with
    its key EMA-moved toward its new records (mode ``experts``), or every weight on the one set (the
    dense baselines). The cycle's step budget ``tcfg.steps`` is split evenly across the sets. Returns
    the report (``consolidate.json``) and the curve rows (``consolidate.csv``)."""
    todo = consolidation(cycle)
    if todo == "none":
        return {"mode": cycle.mode, "experts_trained": 0, "tokens": 0, "sets": []}, []
    selection, sets = coreset.sets(coresets(cycle), new, index, cycle.min_new_data, cycle.new_old_ratio, cycle.seed)
    if todo == "model":
        ((_, _, tokens, _),) = sets
        curves = [train(model, dataclasses.replace(tcfg, domains=("all",)), {"all": tokens}, {}, desc="finetune")]
    else:
        curves = consolidate_experts(model, sets, tcfg)
    rows, trained = [], []
    for entry, c in zip(selection, curves):
        trained.append({**entry, "steps": len(c["train"]), "final_train_bpb": c["train"][-1]["train_bpb"]})
        rows += [{"step": len(rows) + 1, "train_bpb": r["train_bpb"], "coreset": entry["name"]} for r in c["train"]]
    return {"mode": cycle.mode, "experts_trained": len(trained) if todo == "experts" else 0,
            "tokens": len(rows) * tcfg.batch_size * model.cfg.seq_len, "sets": trained}, rows


def learn_growth(model: GPT, meta: dict, new: pa.Table, index: pa.Table, domain: str, cycle: CycleConfig,
                 gcfg: GrowConfig, tcfg: TrainConfig) -> tuple[dict, list[dict], dict]:
    """Grow ``model`` in place as :func:`growth` says: by novelty (each record goes to the grown path
    whose byte sketch explains it better than a held-out sketch of the cycle's own records, which
    consolidates on it with its stored records at ``cycle.new_old_ratio``; the rest grow a path:
    :func:`hst.grow.learn`), from all records, or from the records the surprise detector finds novel.
    The detector is always reported: a record is novel when its BPB under the cycle's start model
    exceeds the ``gcfg.quantile`` of the index records' BPB, and it triggers after ``gcfg.min_batches``
    consecutive batches of ``gcfg.batch_records`` records with more than ``gcfg.novel_share`` novel.
    Returns the report (``grow.json``), the curve rows (``grow.csv``) and the checkpoint meta's update."""
    todo = growth(cycle, gcfg, model.cfg.ffn)
    limit = novelty.threshold(index["bpb"].to_pylist(), gcfg.quantile)
    found = novelty.detect(new["bpb"].to_pylist(), limit, gcfg)
    report = {"applicable": model.cfg.ffn == "key", "threshold_bpb": limit,
              "novel_record_share": sum(found.novel) / max(len(found.novel), 1), "batch_shares": found.shares,
              "records_until_detection": found.records_until_detection,
              "triggered": todo == "all" or (todo == "novel" and found.trigger is not None)}
    curves, stats, old, update = {}, [], [], {}
    if todo == "by_novelty":
        owners = grow.path_domains(meta, model.n_paths)
        report["decision"], curves["train"] = grow.learn(model, new, index, owners, domain, gcfg, tcfg,
                                                          cycle.new_old_ratio, cycle.seed)
        report["triggered"] = report["decision"]["grown_path"] is not None
        update = {"path_domains": owners}
    elif report["triggered"]:
        fresh = new.filter(pa.array([bool(flag) or todo == "all" for flag in found.novel]))
        if gcfg.old_share:
            old = coreset.mix(fresh, index, 1 - gcfg.old_share, cycle.seed).query("kind == 'old'")["text"].tolist()
        held_in = sampler.tokens_by_source(index) if held_in_text(gcfg, model) else {}
        layers, tokens = list(range(model.cfg.n_layer)), data.encode(fresh["text"].to_pylist())
        if gcfg.select == "gate":
            _, curves, stats = gates.grow(model, layers, tokens, held_in, gcfg, tcfg, data.encode(old) if old else None)
        else:
            _, curves, stats = grow.grow(model, layers, tokens, held_in, gcfg, tcfg)
    return ({**report, "old_records": len(old), "grown": stats, "held_in_bpb_change": curves.get("held_in_bpb_change", {}),
             "experts_per_layer": model.n_experts, "paths": model.n_paths}, curves.get("train", []), update)
