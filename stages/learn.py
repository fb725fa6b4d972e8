"""DVC stage `learn`: what the cycle's Smart Sampler records teach the model; trains only that and
writes the cycle's checkpoint.

First the consolidation the mode asks for (``hst.cycle.consolidate``): mode ``experts`` finetunes each
expert that is primary for at least ``cycle.min_new_data`` new records alone, bottom-up, on its
coreset (its new records plus old index records routed to it at ``cycle.new_old_ratio``) and moves its
key toward its new records; modes ``full``/``full_replay`` (the dense baselines) train every weight
on the new records (with replay: mixed with old ones). The cycle's ``consolidate.steps`` is split
evenly across the sets. Then growth (``hst.cycle.learn_growth``). Default (``cycle.mode: grow``,
``grow.select: posterior``, ``grow.decide: novelty``): each record goes to the grown path whose byte
sketch explains it better than a held-out sketch of the cycle's own records; such a path
consolidates on its records mixed with its stored ones, and the rest grow a new path of
``grow.experts`` experts per layer. In mode ``experts`` the surprise detector decides whether to grow,
and from which records. The buffer's records are marked consumed in the checkpoint, so the next
`collect` does not offer them again. This stage reads no validation text.
"""

from __future__ import annotations

import argparse

from hst import checkpoint, cycle, sampler
from hst.config import CycleConfig, GrowConfig, TrainConfig
from hst.io import write_csv, write_json
from hst.params import check_cycle_mode, load_section
from stages.common import cycle_domain, model_config, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--cycle", required=True)
    ap.add_argument("--checkpoint", required=True, help="checkpoint the cycle starts from")
    ap.add_argument("--buffer", required=True, help="Smart Sampler buffer of the cycle")
    ap.add_argument("--index", required=True, help="the cycle's index of held-in records")
    ap.add_argument("--out", required=True, help="the cycle's final checkpoint")
    ap.add_argument("--consolidate-metrics", required=True)
    ap.add_argument("--consolidate-curves", required=True, help="CSV of consolidation loss per step")
    ap.add_argument("--grow-metrics", required=True)
    ap.add_argument("--grow-curves", required=True, help="CSV of growth loss per step")
    args = ap.parse_args()

    ccfg = load_section(args.params, "cycle", CycleConfig)
    gcfg = load_section(args.params, "grow", GrowConfig)
    tcfg = load_section(args.params, "consolidate", TrainConfig)
    domain = cycle_domain(load_section(args.params, "cycles"), args.cycle)
    model, meta = checkpoint.load(args.checkpoint, model_config(args.params))
    check_cycle_mode(ccfg.mode, model.cfg.ffn)
    new = sampler.load_records(args.buffer)
    index = sampler.read_buffer(args.index, columns=cycle.index_columns(ccfg, gcfg, model))
    consolidated, consolidate_rows = cycle.consolidate(model, new, index, ccfg, tcfg)
    grown, grow_rows, update = cycle.learn_growth(model, meta, new, index, domain, ccfg, gcfg, tcfg)
    learned = [*meta["learned_domains"], *([domain] if domain not in meta["learned_domains"] else [])]
    consumed = sorted(set(meta.get("consumed", [])) | set(new["record_id"].to_pylist()))
    checkpoint.save(args.out, model, {**meta, **update, "stage": "learn", "cycle": args.cycle,
                                      "learned_domains": learned, "consumed": consumed})
    write_csv(args.consolidate_curves, consolidate_rows, columns=["step", "train_bpb", "coreset"])
    write_json(args.consolidate_metrics, consolidated)
    write_csv(args.grow_curves, grow_rows, columns=["step", "train_bpb", "lr"])
    write_json(args.grow_metrics, grown)


if __name__ == "__main__":
    run(main)
