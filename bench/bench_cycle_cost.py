"""What a cycle's inference stages cost as paths accumulate (issue 32 item 5): seconds and model passes
per token of `collect` (``cycle.incoming_records`` records of one domain routed by the Smart Sampler),
`build_index` (``cycle.index_records`` records of every learned domain) and `evaluate`
(``cycle.eval_windows`` validation windows of every domain, for the cycle's start model and its final
one: twice the figure here), each on a model that runs its paths as the default does
(``grow.inference``), at the default's sizes on the prepared corpus; `collect` reads the last
cycle's domain. Models run round-robin so drifts in machine load hit all of them alike; the
seconds are medians of the rounds.

Models: the pretrained shape without paths, the same with 5 and 13 growth paths built as
``bench/bench_paths.py`` builds them (untrained: path 0 never stops beside the selection, so their
passes are an upper bound), and with ``--champion`` the default pipeline's last champion (5 trained
paths) beside its pretrained champion. A stage that ran every path for every record would cost P
passes per token; these stay near 1–2 whatever P is. Writes a JSON (``--out``) and prints a Markdown table.

    python bench/bench_cycle_cost.py [--paths 5 13] [--champion models/c4_gcide.champion.pt]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from bench_paths import PREPARED, model_with_paths

from hst import checkpoint, data, evaluation, sampler
from hst.config import CycleConfig, ModelConfig
from hst.model import GPT
from hst.params import load_section


def stage_inputs(cfg: CycleConfig, domains: list[str], new: str) -> dict:
    """What each stage reads, loaded once (not timed): `collect`'s records of ``new``, `build_index`'s of
    every domain, `evaluate`'s validation tokens of every domain."""
    records = {d: data.load_records(PREPARED, d, "train") for d in domains}
    return {"collect": data.sample_records(records[new], cfg.incoming_records, "collect"),
            "build_index": [data.sample_records(records[d], cfg.index_records, f"index:{d}") for d in domains],
            "evaluate": {d: data.load_tokens(PREPARED, d, "val") for d in domains}}


def stage_costs(model: GPT, cfg: CycleConfig, inputs: dict) -> dict[str, dict[str, float]]:
    """Per stage, the seconds ``model`` spends on the stage's records or windows (:func:`stage_inputs`) and
    the model passes per token it spent there (tokens its paths ran above the shared trunk ÷ tokens the
    trunk ran)."""
    work = {"collect": lambda: sampler.route_records(model, inputs["collect"]),
            "build_index": lambda: [sampler.route_records(model, texts) for texts in inputs["build_index"]],
            "evaluate": lambda: evaluation.evaluate_domains(model, inputs["evaluate"], cfg.eval_windows)}
    tokens = {"trunk": 0, "paths": 0}
    trunk, from_trunk = model.trunk, model.from_trunk

    def count(kind, fn):
        def counted(x, *args, **kwargs):
            tokens[kind] += x.shape[0] * x.shape[1]
            return fn(x, *args, **kwargs)
        return counted

    model.trunk, model.from_trunk = count("trunk", trunk), count("paths", from_trunk)
    out = {}
    try:
        for stage, run in work.items():
            tokens.update(trunk=0, paths=0)
            start = time.perf_counter()
            run()
            out[stage] = {"seconds": time.perf_counter() - start, "passes": tokens["paths"] / tokens["trunk"]}
    finally:
        del model.trunk, model.from_trunk  # the class's methods again
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--paths", type=int, nargs="+", default=[5, 13])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--champion", default="", help="also the default pipeline's last champion (trained paths)")
    ap.add_argument("--pretrained", default="models/pretrain.champion.pt")
    ap.add_argument("--out", default="docs/bench/cycle_cost.json")
    args = ap.parse_args()
    cfg = load_section(args.params, "cycle", CycleConfig)
    mcfg = load_section(args.params, "model", ModelConfig)
    grow = load_section(args.params, "grow")
    domains = data.prepared_domains(PREPARED)
    models = {}
    for p in [1, *args.paths]:
        models[f"{p} paths" if p > 1 else "pretrained shape"] = model = model_with_paths(mcfg, p, grow["experts"], domains)
        model.inference = grow["inference"]
    if args.champion:
        models["pretrained champion"] = checkpoint.load(args.pretrained)[0].eval()
        models["champion"] = checkpoint.load(args.champion)[0].eval()
    new = list(load_section(args.params, "cycles").values())[-1]["domain"]
    inputs = stage_inputs(cfg, domains, new)
    rounds = [{name: stage_costs(m, cfg, inputs) for name, m in models.items()} for _ in range(args.rounds)]
    costs = {name: {"paths": m.n_paths, **{stage: {"seconds": statistics.median(r[name][stage]["seconds"] for r in rounds),
                                                   "passes": rounds[0][name][stage]["passes"]}
                                           for stage in rounds[0][name]}}
             for name, m in models.items()}
    result = {"setup": {"domains": len(domains), "collect_domain": new, "rounds": args.rounds,
                        "incoming_records": cfg.incoming_records,
                        "index_records": cfg.index_records, "eval_windows": cfg.eval_windows,
                        "inference": grow["inference"], "threads": torch.get_num_threads(), "torch": torch.__version__},
              "stages": costs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    stages = ("collect", "build_index", "evaluate")
    print("| model | paths | " + " | ".join(f"{s} s (passes)" for s in stages) + " |\n| --- | --- |" + " --- |" * 3)
    for name, c in costs.items():
        print(f"| {name} | {c['paths']} | " + " | ".join(f"{c[s]['seconds']:.1f} ({c[s]['passes']:.2f})" for s in stages) + " |")


if __name__ == "__main__":
    main()
