"""Regenerate the results table of `docs/pipeline.md` from the cycle metrics (`metrics/eval/<cycle>.json`).

Each variant is read from the workspace, from a DVC experiment (its git ref under `refs/exps`, where
`dvc exp run -n NAME` stores the metrics files) or from a directory that `compare_table.py --export`
filled from one (committed, so the table rebuilds in a fresh clone; see ``hst.runs``):

    python -m scripts.results_table --variant "HST=workspace" \
        --variant "dense finetune=docs/runs/dense_finetune" --variant "dense + replay=exp:dense-replay"

The table replaces the text between the results markers in docs/pipeline.md; no number is typed by hand.
With ``--mlflow`` the same variants go into the MLflow store instead (``$MLFLOW_TRACKING_URI``, else
the project's ``mlflow.db``), each as a parent run named LABEL with its cycles' metrics at ``step`` =
cycle, beside any run the `track` stage logged: one chart view compares them, also in a fresh clone
(``hst.runs.track``; a variant's cycles already there are not logged again).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


from hst.io import replace_section
from hst.params import load_section
from hst.runs import BENCH, SPEED_NOTE, forward_speed, inference_cost, pct, read_metrics, speed, track
from hst.tracking import store_uri


def table(variants: list[tuple[str, str]], cycles: list[str], bench: dict) -> str:
    lines = ["| variant | cycle (new domain) | avg forgetting | worst forgetting | absorption (BPB) "
             "| routing stability | experts per layer | inference MFLOPs per token | forward tokens/s ÷ dense (bench) "
             "| parameters |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, source in variants:
        for cycle in cycles:
            m = read_metrics(source, f"metrics/eval/{cycle}.json")
            worst = max(m["forgetting"], key=m["forgetting"].get)
            stab = m["routing_stability_mean"]
            cost = inference_cost(source, m)
            lines.append(
                f"| {label} | {cycle} ({m['domain']}) | {pct(m['avg_forgetting'])} | "
                f"{pct(m['worst_forgetting'])} ({worst}) | {m['absorption']:.3f} | "
                f"{'–' if stab is None else f'{100 * stab:.1f} %'} | {'/'.join(map(str, m['experts_per_layer']))} | "
                f"{cost['mflops_per_token']:.1f} | {speed(forward_speed(source, cycle, bench))} "
                f"| {cost['parameters'] / 1e6:.1f} M |")
    return "\n".join(lines + ["", SPEED_NOTE])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", required=True, help="LABEL=workspace, LABEL=exp:NAME or LABEL=DIRECTORY")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--doc", default="docs/pipeline.md", help="the Markdown file holding the results markers")
    ap.add_argument("--bench", default=BENCH, help="the bench run forward speeds come from (bench/bench_paths.py --champion)")
    ap.add_argument("--mlflow", action="store_true", help="log the variants into the MLflow store, not the table")
    args = ap.parse_args()
    variants = [tuple(v.split("=", 1)) for v in args.variant]
    if args.mlflow:
        uri = store_uri(os.environ, Path.cwd())
        for label, source in variants:
            print(f"{label}: {', '.join(track(source, label, uri)) or 'already logged'} -> {uri}")
        return
    cycles = list(load_section(args.params, "cycles"))
    replace_section(args.doc, "results", table(variants, cycles, json.loads(Path(args.bench).read_text())))


if __name__ == "__main__":
    main()
