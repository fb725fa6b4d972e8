"""DVC stage `grow`: the seed's expert-growth recipe (§3.3), deciding per layer from the cycle's
Smart Sampler records.

A layer grows when the share of novel tokens (best key similarity below
``model.novelty_threshold``) exceeds ``grow.novel_share`` in ``grow.min_batches`` consecutive
batches of ``grow.batch_records`` records. The new expert's key is the normalized mean of the
unrouted hidden states, its weights copied from the nearest expert (or random); then only the new
experts train on the records of the triggering data. The decision and the novelty statistics per
layer go to the metrics either way. The output checkpoint is the cycle's final model.
"""

from __future__ import annotations

import argparse

from hst import checkpoint, data, grow, sampler
from hst.config import GrowConfig, TrainConfig, build
from hst.io import write_csv, write_json
from stages.common import cycle_domain, load_params, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--cycle", required=True)
    ap.add_argument("--checkpoint", required=True, help="consolidated checkpoint")
    ap.add_argument("--buffer", required=True)
    ap.add_argument("--out", required=True, help="the cycle's final checkpoint")
    ap.add_argument("--metrics", required=True)
    ap.add_argument("--curves", required=True)
    args = ap.parse_args()

    grow_sec, train_sec, cycles = load_params(args.params, "grow", "consolidate", "cycles")
    cfg = build(GrowConfig, grow_sec, "params.yaml:grow")
    tcfg = build(TrainConfig, train_sec, "params.yaml:consolidate")
    domain = cycle_domain(cycles, args.cycle)
    model, meta = checkpoint.load(args.checkpoint)
    new = sampler.load_records(args.buffer)
    novel = new["novel_share"].to_pylist()
    n_tokens = new["n_tokens"].to_pylist()
    layers = []
    for layer in range(len(novel[0]) if model.cfg.ffn == "key" else 0):
        shares = grow.batch_novelty([s[layer] for s in novel], n_tokens, cfg.batch_records)
        layers.append({"layer": layer, "novel_share": sum(shares) / len(shares), "max_batch_share": max(shares),
                       "triggered": cfg.enabled and grow.triggered(shares, cfg.novel_share, cfg.min_batches)})
    grown, curves = [], {}
    to_grow = [s["layer"] for s in layers if s["triggered"]]
    if to_grow:
        grown, curves = grow.grow(model, to_grow, data.encode(new["text"].to_pylist()), cfg, tcfg)
    meta = {**meta, "stage": "grow", "cycle": args.cycle,
            "learned_domains": [*meta["learned_domains"], domain]}
    checkpoint.save(args.out, model, meta)
    write_csv(args.curves, curves.get("train", []), columns=["step", "train_bpb", "lr"])
    write_json(args.metrics, {"applicable": model.cfg.ffn == "key", "layers": layers,
                              "grown": [{"layer": l, "expert": e} for l, e in grown],
                              "experts_per_layer": model.n_experts})


if __name__ == "__main__":
    run(main)
