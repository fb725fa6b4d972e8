"""DVC stage `build_index`: route old training records of every domain the checkpoint has learned
and write the expert index (seed §11.5): one Smart Sampler row per record, with its primary expert
per layer. Rebuilt whenever the checkpoint changes.

With ``cycle.replay: generated`` no old record is read: the index holds ``cycle.replay_records``
records sampled from the checkpoint itself (source ``generated``), which then stand in for old text
in the coresets and as the growth gates' held-in reference.
"""

from __future__ import annotations

import argparse

from hst import checkpoint, data, generate, sampler
from hst.config import CycleConfig
from hst.params import load_section
from stages.common import model_config, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--checkpoint", required=True, help="checkpoint the cycle starts from")
    ap.add_argument("--prepared", required=True)
    ap.add_argument("--out", required=True, help="index Parquet file")
    args = ap.parse_args()

    cfg = load_section(args.params, "cycle", CycleConfig)
    model, meta = checkpoint.load(args.checkpoint, model_config(args.params))
    if cfg.replay == "generated":
        texts = generate.sample_records(model, cfg.replay_records, model.cfg.seq_len, cfg.seed)
        sources = {"generated": [t for t in texts if t]}  # a sample of only invalid UTF-8 decodes to ""
    else:
        sources = {d: data.sample_records(data.load_records(args.prepared, d, "train"), cfg.index_records,
                                          f"{cfg.seed}:{d}") for d in meta["learned_domains"]}
    rows: list[dict] = []
    for source, texts in sources.items():
        rows += sampler.make_rows(model, texts, source, len(rows), desc=f"index {source}")
    sampler.write_rows(args.out, rows)


if __name__ == "__main__":
    run(main)
