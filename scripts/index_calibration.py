"""How growth's calibration (the `learn` stage) depends on the index size and on the gate's sample.

In mode ``grow`` a cycle reads the previous champion's index for two things only: the novelty
threshold (``grow.quantile`` of the index records' BPB) and the gates' held-in text. For each cycle
of the finished default pipeline, each size n and each gate sample of w windows, this takes the
first n records per domain of that index and reports the threshold, the share of the cycle's buffer
marked novel and, per layer, a gate fitted on w windows as ``hst.grow.grow`` fits it: the share of
the cycle's new tokens it passes and the largest share of any learned domain's *validation* tokens
it passes (out-of-sample false positives; the target is ``grow.gate_fpr``), both measured on
``--eval-windows`` windows (0: the w windows the gate was fitted on), for each gate kind
``--hidden`` (0: linear Fisher gate, h: an MLP scorer of width h; default ``grow.gate_hidden``).
Sizes above the index's ``cycle.index_records`` see the whole index:

    python -m scripts.index_calibration --sizes 600 300 150 100 --windows 64 --eval-windows 0 \
        --out docs/runs/index_calibration.json
    python -m scripts.index_calibration --sizes 150 --windows 64 128 256 --hidden 0 --out docs/runs/gate_windows.json
    python -m scripts.index_calibration --sizes 150 --windows 256 --hidden 0 128 --out docs/runs/gate_mlp.json
"""

from __future__ import annotations

import argparse
import json

import pyarrow as pa

from hst import checkpoint, cycle, data, novelty, sampler
from hst.config import CycleConfig, GrowConfig, TrainConfig
from hst.evaluation import ffn_inputs
from hst.io import write_json
from hst.params import load_section, read_params
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
    ap.add_argument("--sizes", type=int, nargs="+", default=[600, 300, 150, 100], help="index records per domain")
    ap.add_argument("--windows", type=int, nargs="+", default=[64], help="windows per source the gate is fitted on")
    ap.add_argument("--eval-windows", type=int, default=256, help="windows pass rates are measured on; 0: the fit's")
    ap.add_argument("--hidden", type=int, nargs="+", help="gate MLP widths (0: linear); default grow.gate_hidden")
    ap.add_argument("--out", required=True, help="JSON report")
    args = ap.parse_args()
    params = read_params("params.yaml")
    cfg = load_section("params.yaml", "grow", GrowConfig)
    ccfg, tcfg = load_section("params.yaml", "cycle", CycleConfig), load_section("params.yaml", "consolidate", TrainConfig)
    report = {}
    for key, item in params["cycles"].items():
        model, meta = checkpoint.load(f"models/{item['prev']}.champion.pt")
        index = sampler.read_buffer(f"indexes/{item['prev']}.parquet")
        new = sampler.load_records(f"cycles/{key}/buffer")
        cycle.consolidate(model, new, index, ccfg, tcfg)  # the model growth starts from (mode experts consolidates first)
        new_tokens = data.encode(new["text"].to_pylist())
        val = [data.load_tokens("data/prepared", d, "val") for d in meta["learned_domains"]]
        layers = list(range(model.cfg.n_layer))
        memo: dict[tuple[str, int], list] = {}  # the new records' and validation inputs depend only on the window count

        def inputs(name: str, tokens, w: int) -> list:
            if (name, w) not in memo:
                memo[name, w] = ffn_inputs(model, tokens, layers, w)
            return memo[name, w]

        for n, w in ((n, w) for n in args.sizes for w in args.windows):
            sub = first_per_source(index, n)
            limit = novelty.threshold(sub["bpb"].to_pylist(), cfg.quantile)
            novel_share = round(sum(novelty.detect(new["bpb"].to_pylist(), limit, cfg).novel) / len(new), 3)
            x_old = [ffn_inputs(model, t, layers, w) for t in sampler.tokens_by_source(sub).values()]
            x_new = inputs("new", new_tokens, w)
            e = args.eval_windows or w
            x_new_eval, x_val = inputs("new", new_tokens, e), [inputs(f"val{j}", t, e) for j, t in enumerate(val)]
            for h in args.hidden or [cfg.gate_hidden]:
                rows = []
                for i in layers:
                    router = model.moe(i).router
                    gate = novelty.fit_gate([router.features(x[i]) for x in x_old], router.features(x_new[i]), cfg.gate_fpr, h)
                    share = lambda x: round(float(gate_open(router.features(x), gate).float().mean()), 4)  # noqa: E731
                    rows.append({"pass_new": share(x_new_eval[i]), "val_fpr_max": max(share(v[i]) for v in x_val)})
                report[f"{key}/{n}/{w}/{h}"] = {"records": sub.num_rows, "gate_windows": w, "gate_hidden": h, "eval_windows": e,
                                                  "threshold_bpb": round(limit, 4), "novel_share": novel_share, "layers": rows}
                print(key, n, w, h, json.dumps(rows), flush=True)
    write_json(args.out, report)


if __name__ == "__main__":
    main()
