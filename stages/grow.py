"""DVC stage `grow`: decide from the cycle's Smart Sampler records whether the incoming data is
novel, and if so add new experts to every layer — a path of their own (``grow.select: posterior``,
the default) or behind a learned gate per layer — and train only them on it.

A record is novel when its surprise (BPB under the cycle-start model, logged by `collect`) exceeds
the ``grow.quantile`` of the held-in index records' BPB (`build_index`, same model). Growth
triggers when ``grow.min_batches`` consecutive batches of ``grow.batch_records`` records have more
than ``grow.novel_share`` novel ones. Each new expert's gate is calibrated to let through only
``grow.gate_fpr`` of held-in tokens (the routing stability of the learned domains' validation
tokens across growth is `evaluate`'s to measure: this stage reads no validation text). The output
checkpoint is the cycle's final model.

With ``cycle.mode: grow`` every cycle grows (DEMix-style dedicated capacity, no domain labels: the
cycle's incoming records are the unit) and the new experts train on all incoming records; the
novelty check is still reported. With ``grow.select: posterior`` the new experts form a path of their own instead of sitting behind
gates, and the index's text is not read (``hst.grow.grow_path``). The new experts train at
``grow.lr`` for ``grow.steps``; with
``grow.old_share`` > 0 that share of the training records is sampled from the index (old training
records, or the start model's samples when ``cycle.replay: generated``), and the experts grown in
earlier cycles then train on them at ``consolidate.lr``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import pyarrow as pa
import torch

from hst import checkpoint, coreset, data, grow, novelty, sampler
from hst.config import CycleConfig, GrowConfig, TrainConfig
from hst.io import write_csv, write_json
from hst.params import load_section
from stages.common import cycle_domain, model_config, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--cycle", required=True)
    ap.add_argument("--checkpoint", required=True, help="consolidated checkpoint")
    ap.add_argument("--buffer", required=True)
    ap.add_argument("--index", required=True, help="the cycle's index of held-in records")
    ap.add_argument("--out", required=True, help="the cycle's final checkpoint")
    ap.add_argument("--metrics", required=True)
    ap.add_argument("--curves", required=True)
    args = ap.parse_args()

    cfg = load_section(args.params, "grow", GrowConfig)
    tcfg = load_section(args.params, "consolidate", TrainConfig)
    ccfg = load_section(args.params, "cycle", CycleConfig)
    cycles = load_section(args.params, "cycles")
    domain = cycle_domain(cycles, args.cycle)
    model, meta = checkpoint.load(args.checkpoint, model_config(args.params))
    new = sampler.load_records(args.buffer)
    # A path reads the index's text for path 0's sketch at the first growth (samples of the model with
    # generated replay) and, when novelty decides, for the stored records of the paths it consolidates.
    decides = cfg.select == "posterior" and ccfg.mode == "grow" and cfg.decide == "novelty" and model.cfg.ffn == "key"
    reads_text = cfg.select == "gate" or not len(model.path_sketches) or decides
    index = sampler.read_buffer(args.index, columns=["record_id", "text", "bpb", "source"] if reads_text else ["bpb"])
    limit = novelty.threshold(index["bpb"].to_pylist(), cfg.quantile)
    found = novelty.detect(new["bpb"].to_pylist(), limit, cfg)
    report = {"applicable": model.cfg.ffn == "key", "threshold_bpb": limit,
              "novel_record_share": sum(found.novel) / max(len(found.novel), 1), "batch_shares": found.shares,
              "records_until_detection": found.records_until_detection,
              "triggered": cfg.enabled and model.cfg.ffn == "key" and (found.trigger is not None or ccfg.mode == "grow")}
    learned = [*meta["learned_domains"], *([domain] if domain not in meta["learned_domains"] else [])]
    grown, curves, gates, old = [], {}, [], []
    if decides and cfg.enabled:
        owners = grow.path_domains(meta, model.n_paths)
        report["decision"], curves["train"] = decide(model, new, index, owners, domain, cfg, tcfg, ccfg)
        report["triggered"] = bool(report["decision"]["grown_path"])
        meta = {**meta, "path_domains": owners}
    elif report["triggered"]:
        fresh = new.filter(pa.array([bool(flag) or ccfg.mode == "grow" for flag in found.novel]))
        if cfg.old_share:
            old = coreset.mix(fresh, index, 1 - cfg.old_share, ccfg.seed).query("kind == 'old'")["text"].tolist()
        grown, curves, gates = grow.grow(model, list(range(model.cfg.n_layer)), data.encode(fresh["text"].to_pylist()),
                                         sampler.tokens_by_source(index) if reads_text else {}, cfg,
                                         tcfg, data.encode(old) if old else None)
    meta = {**meta, "stage": "grow", "cycle": args.cycle, "learned_domains": learned}
    checkpoint.save(args.out, model, meta)
    write_csv(args.curves, curves.get("train", []), columns=["step", "train_bpb", "lr"])
    write_json(args.metrics, {**report, "old_records": len(old), "grown": gates,
                              "held_in_bpb_change": curves.get("held_in_bpb_change", {}),
                              "experts_per_layer": model.n_experts, "paths": model.n_paths})


def decide(model, new: pa.Table, index: pa.Table, owners: list[list[str]], domain: str, cfg: GrowConfig,
           tcfg: TrainConfig, ccfg: CycleConfig) -> tuple[dict, list[dict]]:
    """Novelty decides: each known path consolidates on the records it explains mixed with its own
    stored ones (the index's records of its domains, at ``cycle.new_old_ratio``), the rest grow a path.
    ``cfg.steps`` is shared by the trained paths in proportion to their new records. Updates ``owners``
    (the domains of each path) in place; returns the decision's report and the training curve."""
    texts = new["text"].to_pylist()
    todo = grow.plan(model.path_sketches, [data.encode([t]) for t in texts], cfg.min_records)
    used = sum(map(len, todo.consolidate.values())) + len(todo.grow)
    share = {p: round(cfg.steps * len(rows) / used) for p, rows in todo.consolidate.items()}
    curve, consolidated = [], {}
    for path, rows in todo.consolidate.items():
        mine = new.take(rows)
        stored = index.filter(pa.array([s in owners[path] for s in index["source"].to_pylist()]))
        stream = coreset.mix(mine, stored, ccfg.new_old_ratio, ccfg.seed)
        curve += grow.consolidate_path(model, path, data.encode(stream["text"].tolist()),
                                       data.encode(mine["text"].to_pylist()), share[path], cfg, tcfg)
        consolidated[path] = {"new_records": len(rows), "old_records": int((stream["kind"] == "old").sum()),
                              "steps": share[path]}
        owners[path] += [domain] if domain not in owners[path] else []
    grown_path = None
    if todo.grow:
        base = None if len(model.path_sketches) else torch.cat([t.flatten() for t in sampler.tokens_by_source(index).values()])
        steps = cfg.steps - sum(share.values())
        _, phase, _ = grow.grow_path(model, list(range(model.cfg.n_layer)), data.encode([texts[i] for i in todo.grow]),
                                     dataclasses.replace(cfg, steps=steps), tcfg, base)
        curve += phase["train"]
        grown_path = model.n_paths - 1
        owners.append([domain])
    gaps = [g for g in todo.assignment.gap if math.isfinite(g)]
    return {"grown_path": grown_path, "grow_records": len(todo.grow), "consolidated": consolidated,
            "left_records": len(todo.left), "mean_gap_bits": sum(gaps) / len(gaps) if gaps else None,
            "records_per_best_path": {str(p): todo.assignment.best.count(p) for p in sorted(set(todo.assignment.best))},
            "path_domains": owners}, [row | {"step": i + 1} for i, row in enumerate(curve)]


if __name__ == "__main__":
    run(main)
