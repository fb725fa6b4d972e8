"""How the grow stage's calibration changes with fewer expert-index records per learned domain.

In mode ``grow`` a cycle reads the previous champion's index for two things only: the novelty
threshold (``grow.quantile`` of the index records' BPB) and the gates' held-in text. For each cycle
of the finished default pipeline and each size n, this takes the first n records per domain of that
index, and reports the threshold, the share of the cycle's buffer marked novel and, per layer, a
gate fitted as ``hst.grow.grow`` fits it: the share of the cycle's new tokens it passes and the
largest share of any learned domain's *validation* tokens it passes (out-of-sample false positives;
the target is ``grow.gate_fpr``). Sizes above the index's ``cycle.index_records`` see the whole index:

    python -m scripts.index_calibration --sizes 600 300 150 100 --out docs/runs/index_calibration.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow as pa
import yaml

from hst import checkpoint, data, novelty, sampler
from hst.config import GrowConfig, build
from hst.consolidate import ffn_inputs
from hst.io import write_json
from hst.router import gate_open


def first_per_source(index: pa.Table, n: int) -> pa.Table:
    """The first ``n`` rows of every source (an index is a seeded random sample per domain)."""
    keep, seen = [], {}
    for i, source in enumerate(index["source"].to_pylist()):
        seen[source] = seen.get(source, 0) + 1
        if seen[source] <= n:
            keep.append(i)
    return index.take(pa.array(keep, type=pa.int64()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[600, 300, 150, 100])
    ap.add_argument("--out", required=True, help="JSON report")
    args = ap.parse_args()
    params = yaml.safe_load(Path("params.yaml").read_text())
    cfg = build(GrowConfig, params["grow"], "params.yaml:grow")
    report = {}
    for cycle, item in params["cycles"].items():
        model, meta = checkpoint.load(f"models/{cycle}_consolidated.pt")
        index = sampler.read_buffer(f"indexes/{item['prev']}.parquet", columns=["text", "bpb", "source"])
        new = sampler.load_records(f"cycles/{cycle}/buffer")
        layers = list(range(model.cfg.n_layer))
        x_new = ffn_inputs(model, data.encode(new["text"].to_pylist()), layers, cfg.gate_windows)
        x_val = [ffn_inputs(model, data.load_tokens("data/prepared", d, "val"), layers, cfg.gate_windows)
                 for d in meta["learned_domains"]]
        for n in args.sizes:
            sub = first_per_source(index, n)
            limit = novelty.threshold(sub["bpb"].to_pylist(), cfg.quantile)
            x_old = [ffn_inputs(model, t, layers, cfg.gate_windows) for t in sampler.tokens_by_source(sub).values()]
            rows = []
            for i in layers:
                router = model.moe(i).router
                gate = novelty.fit_gate([router.features(x[i]) for x in x_old], router.features(x_new[i]), cfg.gate_fpr)
                share = lambda x: round(float(gate_open(router.features(x), *gate).float().mean()), 4)  # noqa: E731
                rows.append({"pass_new": share(x_new[i]), "val_fpr_max": max(share(v[i]) for v in x_val)})
            report[f"{cycle}/{n}"] = {"records": sub.num_rows, "threshold_bpb": round(limit, 4),
                                      "novel_share": round(sum(b > limit for b in new["bpb"].to_pylist()) / len(new), 3),
                                      "layers": rows}
            print(cycle, n, json.dumps(report[f"{cycle}/{n}"]), flush=True)
    write_json(args.out, report)


if __name__ == "__main__":
    main()
