"""DVC stage `consolidate`: learn the cycle's new data.

mode ``experts`` (HST): for every selected (layer, expert), layer by layer and by expert id, freeze
everything else, finetune that expert on its coreset, then EMA its key toward the new records
routed to it. The cycle's step budget (``consolidate.steps``) is split evenly across the selected
experts, so every mode trains on the same number of tokens. ``cycle.consolidation: parallel`` trains
every expert from the cycle's start model instead and merges them (the Prefect flow runs those as
mapped tasks through ``hst.consolidate.load_job``/``save_job``). modes ``full``/``full_replay``: the
whole model trains on ``all.parquet`` for the whole budget (the dense baselines). mode ``grow``
trains no shared expert (the cycle's budget goes to the new experts of `grow`): the checkpoint
passes through unchanged.
"""

from __future__ import annotations

import argparse

from hst.config import CycleConfig, TrainConfig
from hst.consolidate import load_job, run_job, save_job
from hst.params import load_section
from stages.common import model_config, run


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

    job = load_job(load_section(args.params, "cycle", CycleConfig), load_section(args.params, "consolidate", TrainConfig),
                   model_config(args.params), args.checkpoint, args.coresets, args.buffer)
    save_job(job, run_job(job), args.out, args.metrics, args.curves)


if __name__ == "__main__":
    run(main)
