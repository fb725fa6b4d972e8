"""DVC stage `consolidate`: learn the cycle's new data.

mode ``experts`` (HST): for every selected (layer, expert), layer by layer and by expert id, freeze
everything else, finetune that expert on its coreset, then EMA its key toward the new records
routed to it. The cycle's step budget (``consolidate.steps``) is split evenly across the selected
experts, so every mode trains on the same number of tokens. ``cycle.consolidation: parallel`` trains
every expert from the cycle's start model instead and merges them (the Prefect flow runs those as
mapped tasks through this module's ``load``/``save``). modes ``full``/``full_replay``: the
whole model trains on ``all.parquet`` for the whole budget (the dense baselines). mode ``grow``
trains no shared expert (the cycle's budget goes to the new experts of `grow`): the checkpoint
passes through unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import NamedTuple

import pyarrow.parquet as pq

from hst import checkpoint, data, sampler
from hst.config import ConfigError, CycleConfig, TrainConfig, build
from hst.consolidate import consolidate_experts, consolidate_parallel
from hst.io import read_json, write_csv, write_json
from hst.model import GPT
from hst.train import train
from stages.common import load_params, model_config, run


class Inputs(NamedTuple):
    cfg: CycleConfig
    tcfg: TrainConfig
    model: GPT  # the cycle's start model; consolidated in place
    meta: dict
    selection: list[dict]  # selection.json entries, in training order
    sets: list[tuple]  # mode experts: (layer, expert, coreset tokens, new tokens); else [(None, None, all tokens, None)]
    new_ids: list[str]  # record ids of the buffer, consumed by this cycle


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--checkpoint", required=True, help="checkpoint the cycle starts from")
    ap.add_argument("--coresets", required=True)
    ap.add_argument("--buffer", required=True)
    ap.add_argument("--out", required=True, help="consolidated checkpoint")
    ap.add_argument("--metrics", required=True)
    ap.add_argument("--curves", required=True, help="CSV of training loss per step")
    return ap.parse_args(argv)


def load(args: argparse.Namespace) -> Inputs:
    cycle_sec, train_sec = load_params(args.params, "cycle", "consolidate")
    cfg = build(CycleConfig, cycle_sec, "params.yaml:cycle")
    tcfg = build(TrainConfig, train_sec, "params.yaml:consolidate")
    model, meta = checkpoint.load(args.checkpoint, model_config(args.params))
    if cfg.mode == "experts" and model.cfg.ffn == "dense":
        raise ConfigError("params.yaml:cycle.mode: 'experts' needs model.ffn key or learned (use full or full_replay)")
    if cfg.mode == "grow" and model.cfg.ffn != "key":
        raise ConfigError(f"params.yaml:cycle.mode: 'grow' needs model.ffn key, got {model.cfg.ffn!r} "
                          "(use experts, full or full_replay)")
    selection = read_json(Path(args.coresets) / "selection.json", None)
    new = sampler.load_records(args.buffer)
    coresets = [data.encode(pq.read_table(Path(args.coresets) / f"{e['name']}.parquet").column("text").to_pylist())
                for e in selection]
    if cfg.mode == "experts":
        texts, primaries = new["text"].to_pylist(), new["primary_expert"].to_pylist()
        sets = [(e["layer"], e["expert"], tokens,
                 data.encode([t for t, p in zip(texts, primaries) if p[e["layer"]] == e["expert"]]))
                for e, tokens in zip(selection, coresets)]
    else:
        sets = [(None, None, tokens, None) for tokens in coresets]
    return Inputs(cfg, tcfg, model, meta, selection, sets, new["record_id"].to_pylist())


def consolidate(x: Inputs) -> list[dict]:
    """Train ``x.model`` in place as the mode says; return the curves, one per coreset."""
    if x.cfg.mode == "grow":
        return []
    if x.cfg.mode != "experts":
        ((_, _, tokens, _),) = x.sets
        return [train(x.model, dataclasses.replace(x.tcfg, domains=("all",)), {"all": tokens}, {}, desc="finetune")]
    if x.cfg.consolidation == "parallel":
        return consolidate_parallel(x.model, x.sets, x.tcfg)
    return consolidate_experts(x.model, x.sets, x.tcfg)


def save(args: argparse.Namespace, x: Inputs, curves: list[dict]) -> None:
    rows, trained = [], []
    for entry, c in zip(x.selection, curves):
        trained.append({**entry, "steps": len(c["train"]), "final_train_bpb": c["train"][-1]["train_bpb"]})
        rows += [{"step": len(rows) + 1, "train_bpb": r["train_bpb"], "coreset": entry["name"]} for r in c["train"]]
    meta = {**x.meta, "stage": "consolidate", "consumed": sorted(set(x.meta.get("consumed", [])) | set(x.new_ids))}
    checkpoint.save(args.out, x.model, meta)
    write_csv(args.curves, rows, columns=["step", "train_bpb", "coreset"])
    write_json(args.metrics, {"mode": x.cfg.mode, "consolidation": x.cfg.consolidation,
                              "experts_trained": len(trained) if x.cfg.mode == "experts" else 0,
                              "tokens": len(rows) * x.tcfg.batch_size * x.model.cfg.seq_len, "sets": trained})


def main() -> None:
    args = parse()
    x = load(args)
    save(args, x, consolidate(x))


if __name__ == "__main__":
    run(main)
