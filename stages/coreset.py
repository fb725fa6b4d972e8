"""DVC stage `coreset`: build the training sets of the cycle's consolidation.

mode ``experts`` (HST): for every (layer, expert) that is primary for at least ``min_new_data`` new
records, its new records plus old index records routed to it at ``new_old_ratio`` ->
``L<layer>_E<expert>.parquet``. mode ``full``: all new records -> ``all.parquet``. mode
``full_replay``: all new records plus a random sample of old index records at ``new_old_ratio``
-> ``all.parquet``. mode ``grow`` trains no shared expert: no coreset. ``selection.json`` lists every
coreset with its new/old counts.
"""

from __future__ import annotations

import argparse

from hst import coreset, cycle, sampler
from hst.config import CycleConfig
from hst.io import atomic_path
from hst.params import load_section
from stages.common import run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--buffer", required=True, help="Smart Sampler buffer of the cycle")
    ap.add_argument("--index", required=True, help="expert index of old data")
    ap.add_argument("--out", required=True, help="directory of coreset Parquet files")
    args = ap.parse_args()

    cfg = load_section(args.params, "cycle", CycleConfig)
    todo = cycle.coresets(cfg)
    new = sampler.load_records(args.buffer)
    old = sampler.read_buffer(args.index)
    if todo == "experts":
        n_layers = len(new["primary_expert"][0].as_py())
        sets = {f"L{layer}_E{expert}": (layer, expert, coreset.build_coreset(
                    new, old, layer, expert, cfg.new_old_ratio, cfg.seed))
                for layer, expert, _ in coreset.select_experts(new, n_layers, cfg.min_new_data)}
    elif todo == "none":
        sets = {}
    else:
        ratio = cfg.new_old_ratio if todo == "replay" else 1.0
        sets = {"all": (None, None, coreset.mix(new, old, ratio, cfg.seed))}
    with atomic_path(args.out) as tmp:
        coreset.write_sets(tmp, sets)


if __name__ == "__main__":
    run(main)
