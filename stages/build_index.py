"""DVC stage `build_index`: route old training records of every domain the checkpoint has learned
and write the expert index (seed §11.5): one Smart Sampler row per record, with its primary expert
per layer. Rebuilt whenever the checkpoint changes.
"""

from __future__ import annotations

import argparse

from tqdm import tqdm

from hst import checkpoint, data, sampler
from hst.config import CycleConfig, build
from stages.common import load_params, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--checkpoint", required=True, help="checkpoint the cycle starts from")
    ap.add_argument("--prepared", required=True)
    ap.add_argument("--out", required=True, help="index Parquet file")
    args = ap.parse_args()

    (cycle_sec,) = load_params(args.params, "cycle")
    cfg = build(CycleConfig, cycle_sec, "params.yaml:cycle")
    model, meta = checkpoint.load(args.checkpoint)
    rows = []
    for domain in meta["learned_domains"]:
        records = data.load_records(args.prepared, domain, "train")
        picked = data.sample_records(records, cfg.index_records, f"{cfg.seed}:{domain}")
        rows += [sampler.make_row(model, text, domain) for text in tqdm(picked, desc=f"index {domain}")]
    sampler.write_rows(args.out, rows)


if __name__ == "__main__":
    run(main)
