"""DVC stage `consolidate`: learn the cycle's new data.

mode ``experts`` (HST): for every selected (layer, expert), layer by layer and by expert id, freeze
everything else, finetune that expert on its coreset, then EMA its key toward the new records
routed to it. The cycle's step budget (``consolidate.steps``) is split evenly across the selected
experts, so every mode trains on the same number of tokens. modes ``full``/``full_replay``: the
whole model trains on ``all.parquet`` (the dense baselines).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pyarrow.parquet as pq

from hst import checkpoint, data, sampler
from hst.config import ConfigError, CycleConfig, TrainConfig, build
from hst.consolidate import consolidate_expert
from hst.io import write_csv, write_json
from hst.train import train
from stages.common import load_params, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--checkpoint", required=True, help="checkpoint the cycle starts from")
    ap.add_argument("--coresets", required=True)
    ap.add_argument("--buffer", required=True)
    ap.add_argument("--out", required=True, help="consolidated checkpoint")
    ap.add_argument("--metrics", required=True)
    ap.add_argument("--curves", required=True, help="CSV of training loss per step")
    args = ap.parse_args()

    cycle_sec, train_sec = load_params(args.params, "cycle", "consolidate")
    cfg = build(CycleConfig, cycle_sec, "params.yaml:cycle")
    tcfg = build(TrainConfig, train_sec, "params.yaml:consolidate")
    model, meta = checkpoint.load(args.checkpoint)
    if cfg.mode == "experts" and model.cfg.ffn == "dense":
        raise ConfigError("params.yaml:cycle.mode: 'experts' needs model.ffn key or learned (use full or full_replay)")
    selection = json.loads((Path(args.coresets) / "selection.json").read_text())
    new = sampler.load_records(args.buffer)
    rows, trained = [], []
    steps = max(tcfg.steps // max(len(selection), 1), 1)
    for i, entry in enumerate(selection):
        texts = pq.read_table(Path(args.coresets) / f"{entry['name']}.parquet").column("text").to_pylist()
        tokens = data.encode(texts)
        run_cfg = dataclasses.replace(tcfg, steps=steps, warmup_steps=min(tcfg.warmup_steps, steps),
                                      seed=tcfg.seed + i)
        if cfg.mode == "experts":
            layer, expert = entry["layer"], entry["expert"]
            mine = [t for t, p in zip(new["text"].to_pylist(), new["primary_expert"].to_pylist()) if p[layer] == expert]
            curves = consolidate_expert(model, layer, expert, tokens, data.encode(mine), run_cfg)
        else:
            curves = train(model, dataclasses.replace(run_cfg, domains=("all",)), {"all": tokens}, {},
                           desc="finetune")
        trained.append({**entry, "steps": steps, "final_train_bpb": curves["train"][-1]["train_bpb"]})
        rows += [{"step": len(rows) + 1, "train_bpb": r["train_bpb"], "coreset": entry["name"]} for r in curves["train"]]

    meta = {**meta, "stage": "consolidate", "consumed": sorted(set(meta.get("consumed", [])) | set(new["record_id"].to_pylist()))}
    checkpoint.save(args.out, model, meta)
    write_csv(args.curves, rows)
    write_json(args.metrics, {"mode": cfg.mode, "experts_trained": len(trained), "steps_per_set": steps,
                              "tokens": steps * tcfg.batch_size * model.cfg.seq_len * len(trained), "sets": trained})


if __name__ == "__main__":
    run(main)
