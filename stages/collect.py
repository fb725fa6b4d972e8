"""DVC stage `collect`: serve the cycle's incoming texts through the model and log every record
with its routing through the Smart Sampler (schema: ``hst.sampler``).

Records already learned in an earlier cycle (their ids are in the checkpoint's ``consumed`` list)
are skipped, so no record is consumed twice; the buffer directory is written whole and atomically.
"""

from __future__ import annotations

import argparse

from hst import checkpoint, data, sampler
from hst.config import CycleConfig
from hst.data import DataError
from hst.io import atomic_path
from hst.params import load_section
from stages.common import cycle_domain, model_config, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--cycle", required=True, help="key of the cycle in params.yaml:cycles")
    ap.add_argument("--checkpoint", required=True, help="checkpoint serving inference")
    ap.add_argument("--prepared", required=True)
    ap.add_argument("--out", required=True, help="Smart Sampler buffer directory")
    args = ap.parse_args()

    cfg, cycles = load_section(args.params, "cycle", CycleConfig), load_section(args.params, "cycles")
    domain = cycle_domain(cycles, args.cycle)
    model, meta = checkpoint.load(args.checkpoint, model_config(args.params))
    consumed = set(meta.get("consumed", []))
    records = [r for r in data.load_records(args.prepared, domain, "train") if data.record_id(r) not in consumed]
    if not records:
        raise DataError(f"cycle {args.cycle!r}: no incoming records for domain {domain!r} "
                        f"(empty, or all already consumed by earlier cycles)")
    incoming = data.sample_records(records, cfg.incoming_records, f"{cfg.seed}:{args.cycle}")
    with atomic_path(args.out) as tmp, sampler.SmartSampler(tmp) as smart:
        smart.record(model, incoming, domain, desc=f"collect {domain}")


if __name__ == "__main__":
    run(main)
