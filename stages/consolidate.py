"""DVC stage `consolidate`: learn the cycle's new data.

mode ``experts`` (HST): for every selected (layer, expert), layer by layer and by expert id, freeze
everything else, finetune that expert on its coreset, then EMA its key toward the new records
routed to it. The cycle's step budget (``consolidate.steps``) is split evenly across the selected
experts, so every mode trains on the same number of tokens. modes ``full``/``full_replay``: the
whole model trains on ``all.parquet`` for the whole budget (the dense baselines).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pyarrow.parquet as pq

from hst import checkpoint, data, sampler
from hst.config import ConfigError, CycleConfig, TrainConfig, build
from hst.consolidate import consolidate_experts
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
    sets = [(entry, data.encode(pq.read_table(Path(args.coresets) / f"{entry['name']}.parquet")
                                .column("text").to_pylist())) for entry in selection]
    if cfg.mode == "experts":
        texts, primaries = new["text"].to_pylist(), new["primary_expert"].to_pylist()
        curves = consolidate_experts(model, [
            (e["layer"], e["expert"], tokens,
             data.encode([t for t, p in zip(texts, primaries) if p[e["layer"]] == e["expert"]]))
            for e, tokens in sets], tcfg)
    else:
        ((_, tokens),) = sets
        curves = [train(model, dataclasses.replace(tcfg, domains=("all",)), {"all": tokens}, {}, desc="finetune")]
    rows, trained = [], []
    for (entry, _), c in zip(sets, curves):
        trained.append({**entry, "steps": len(c["train"]), "final_train_bpb": c["train"][-1]["train_bpb"]})
        rows += [{"step": len(rows) + 1, "train_bpb": r["train_bpb"], "coreset": entry["name"]} for r in c["train"]]

    meta = {**meta, "stage": "consolidate", "consumed": sorted(set(meta.get("consumed", [])) | set(new["record_id"].to_pylist()))}
    checkpoint.save(args.out, model, meta)
    write_csv(args.curves, rows)
    summary = {"mode": cfg.mode, "experts_trained": len(trained) if cfg.mode == "experts" else 0,
               "tokens": len(rows) * tcfg.batch_size * model.cfg.seq_len, "sets": trained}
    if model.cfg.expert_density < 1:  # sparse experts: connections moved by prune-and-regrow
        summary["connections_moved"] = sum(c["topology"]["moved"] for c in curves)
    write_json(args.metrics, summary)


if __name__ == "__main__":
    run(main)
