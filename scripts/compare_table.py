"""The seed's §8 comparison measured: dense vs standard (learned-router) MoE vs HST on the default
learn–consolidate cycles.

    python -m scripts.compare_table --run     # the four baselines as DVC experiments (two pretrainings)
    python -m scripts.compare_table --export  # the experiments already ran (e.g. `dvc queue start -j 2`)
    python -m scripts.compare_table           # rebuild the table from the committed runs

HST is the workspace (the default `dvc repro`). Each baseline is the same scenario run as a DVC
experiment with the settings of ``BASELINES`` and the promotion gate open, so a cycle that forgets
still becomes the next cycle's start (plain sequential finetuning). ``--run`` runs every baseline
in the workspace (``hst.runs.run_experiments``: the two learned-router baselines share one
pretraining, the two dense ones another); ``--run`` and ``--export`` then copy each experiment's ``params.yaml``
and ``metrics/`` into ``--runs``/<name>, so the numbers are committed next to the table and it
rebuilds without the experiments' git refs. Each experiment's `track` stages log it into the
project's MLflow store as variant <name>, also from `--temp` and queued runs (docs/mlflow.md).

Per variant, over the cycles of params.yaml: mean BPB over all domains after the last cycle, mean of
the per-cycle average forgetting on the old domains, the worst single forgetting, mean absorption
(BPB gained on the new domain), mean routing stability, and from the variant's own params.yaml the
model's active FLOPs per token, parameter count and experts per layer after the last cycle. The
table goes between the ``compare`` markers of --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


from hst.io import replace_section
from hst.params import load_section
from hst.runs import (BENCH, OPEN_GATE, REPLAY_POOL, SPEED_NOTE, export, forward_speed, inference_cost, model_of, pct,
                      read_metrics, run_experiments, speed)


# label -> (DVC experiment name, params overrides besides OPEN_GATE)
BASELINES = {
    "standard MoE + HST consolidation": ("learned-consolidate", ["model.ffn=learned", "cycle.mode=experts", *REPLAY_POOL]),
    "standard MoE, finetune": ("learned-finetune", ["model.ffn=learned", "cycle.mode=full"]),
    "dense, finetune": ("dense-finetune", ["model.ffn=dense", "cycle.mode=full"]),
    "dense + replay": ("dense-replay", ["model.ffn=dense", "cycle.mode=full_replay", *REPLAY_POOL]),
}


def row(label: str, source: str, cycles: list[str], bench: dict) -> str:
    reports = [read_metrics(source, f"metrics/eval/{c}.json") for c in cycles]
    worst = max(((r["forgetting"][d], d, r["name"]) for r in reports for d in r["forgetting"]))
    stab = [r["routing_stability_mean"] for r in reports if r["routing_stability_mean"] is not None]
    experts = reports[-1]["experts_per_layer"]
    model, cost = model_of(source, experts), inference_cost(source, reports[-1])
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return (f"| {label} | {mean(list(reports[-1]['bpb'].values())):.3f} | {pct(mean([r['avg_forgetting'] for r in reports]))} | {pct(worst[0])} ({worst[1]}, {worst[2]}) "
            f"| {mean([r['absorption'] for r in reports]):.3f} | {f'{100 * mean(stab):.1f} %' if stab else '–'} "
            f"| {cost['mflops_per_token']:.2f} | {speed(forward_speed(source, cycles[-1], bench))} | {cost['parameters'] / 1e6:.2f} M "
            f"| {'/'.join(map(str, experts)) if model.cfg.ffn != 'dense' else '–'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--run", action="store_true", help="run every baseline as a DVC experiment, then export it")
    mode.add_argument("--export", action="store_true", help="export the baselines' existing DVC experiments")
    ap.add_argument("--runs", default="docs/runs", help="a baseline's params and metrics go to RUNS/<experiment>")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="docs/results.md")
    ap.add_argument("--bench", default=BENCH, help="the bench run forward speeds come from (bench/bench_paths.py --champion)")
    args = ap.parse_args()
    if args.run:
        run_experiments([(name, overrides + OPEN_GATE) for name, overrides in BASELINES.values()])
    variants = [("HST", "workspace")]
    for label, (name, _) in BASELINES.items():
        run_dir = Path(args.runs) / name.replace("-", "_")
        if args.run or args.export:
            export(name, run_dir)
        variants.append((label, str(run_dir)))
    cycles = list(load_section(args.params, "cycles"))
    lines = ["| variant | BPB after the last cycle (mean, all domains) | avg forgetting (mean of cycles) | worst forgetting | absorption (mean BPB) "
             "| routing stability | active MFLOPs per token | forward tokens/s ÷ dense (bench) | parameters | experts per layer |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    bench = json.loads(Path(args.bench).read_text())
    lines += [row(label, source, cycles, bench) for label, source in variants]
    settings = "; ".join(f"{label}: `{' '.join(o)}`" for label, (_, o) in BASELINES.items())
    lines += ["", f"Cycles: {', '.join(cycles)}. Forgetting of a domain = relative rise of its validation BPB over "
                  "a cycle; FLOPs: forward matmuls per token, attention over the mean causal context, as the last "
                  "evaluation measured them (every path of a path mixture; the selection's measured passes), or for "
                  "runs exported before it did, `GPT.flops_per_token(all_paths=True)` of the model's shape. "
                  f"{SPEED_NOTE} "
                  f"Baselines: {settings}; each with `{' '.join(OPEN_GATE)}`."]
    replace_section(args.out, "compare", "\n".join(lines))


if __name__ == "__main__":
    main()
