"""DVC stage `grow`: decide what the cycle's Smart Sampler records teach the model, train only that,
and write the cycle's final checkpoint.

Default (``cycle.mode: grow``, ``grow.select: posterior``, ``grow.decide: novelty``): each record
goes to the grown path whose byte sketch explains it better than a held-out sketch of the cycle's
own records; such a path consolidates on its records mixed with its stored ones (the index's
records of its domains), and the rest grow a new path of ``grow.experts`` experts per layer
(``hst.grow.learn``). With ``grow.decide: always`` every cycle grows a path from all its records.

The surprise detector is always reported: a record is novel when its BPB under the cycle-start
model (logged by `collect`) exceeds the ``grow.quantile`` of the index records' BPB, and it triggers
after ``grow.min_batches`` consecutive batches of ``grow.batch_records`` records with more than
``grow.novel_share`` novel ones. In mode ``experts`` it decides whether to grow, and from which
records. With ``grow.select: gate`` the new experts sit behind a learned gate per layer (``hst.gates``), calibrated
on the index's held-in text to let through at most ``grow.gate_fpr`` of its tokens; with
``grow.old_share`` > 0 that share of the training records comes from the index and the experts
grown earlier train on them at ``consolidate.lr``. This stage reads no validation text.
"""

from __future__ import annotations

import argparse

import pyarrow as pa

from hst import checkpoint, coreset, cycle, data, gates, grow, novelty, sampler
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
    growth = cycle.growth(ccfg, cfg, model.cfg.ffn)
    reads_text = cfg.select == "gate" or not len(model.path_sketches) or growth == "by_novelty"
    index = sampler.read_buffer(args.index, columns=["record_id", "text", "bpb", "source"] if reads_text else ["bpb"])
    limit = novelty.threshold(index["bpb"].to_pylist(), cfg.quantile)
    found = novelty.detect(new["bpb"].to_pylist(), limit, cfg)
    report = {"applicable": model.cfg.ffn == "key", "threshold_bpb": limit,
              "novel_record_share": sum(found.novel) / max(len(found.novel), 1), "batch_shares": found.shares,
              "records_until_detection": found.records_until_detection,
              "triggered": growth == "all" or (growth == "novel" and found.trigger is not None)}
    learned = [*meta["learned_domains"], *([domain] if domain not in meta["learned_domains"] else [])]
    curves, stats, old = {}, [], []
    if growth == "by_novelty":
        owners = grow.path_domains(meta, model.n_paths)
        report["decision"], curves["train"] = grow.learn(model, new, index, owners, domain, cfg, tcfg,
                                                          ccfg.new_old_ratio, ccfg.seed)
        report["triggered"] = report["decision"]["grown_path"] is not None
        meta = {**meta, "path_domains": owners}
    elif report["triggered"]:
        fresh = new.filter(pa.array([bool(flag) or growth == "all" for flag in found.novel]))
        if cfg.old_share:
            old = coreset.mix(fresh, index, 1 - cfg.old_share, ccfg.seed).query("kind == 'old'")["text"].tolist()
        held_in = sampler.tokens_by_source(index) if reads_text else {}
        layers, tokens = list(range(model.cfg.n_layer)), data.encode(fresh["text"].to_pylist())
        if cfg.select == "gate":
            _, curves, stats = gates.grow(model, layers, tokens, held_in, cfg, tcfg, data.encode(old) if old else None)
        else:
            _, curves, stats = grow.grow(model, layers, tokens, held_in, cfg, tcfg)
    meta = {**meta, "stage": "grow", "cycle": args.cycle, "learned_domains": learned}
    checkpoint.save(args.out, model, meta)
    write_csv(args.curves, curves.get("train", []), columns=["step", "train_bpb", "lr"])
    write_json(args.metrics, {**report, "old_records": len(old), "grown": stats,
                              "held_in_bpb_change": curves.get("held_in_bpb_change", {}),
                              "experts_per_layer": model.n_experts, "paths": model.n_paths})


if __name__ == "__main__":
    run(main)
