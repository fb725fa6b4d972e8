"""Measure the order of mode ``experts``' consolidation on one cycle's artifacts (after `dvc repro`
has produced them); joint and parallel consolidation, measured with it, are retired (docs/decisions.md):

  bottom-up  layer by layer from the bottom, by expert id (the pipeline's order)
  top-down   the same experts, top layer first

    python scripts/consolidation_order.py --cycle c1_kjv

Prints a markdown table: average / worst forgetting on the old domains, absorption on the new one,
mean routing stability. Same coresets, same step budget, same seed for every variant.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


from hst import checkpoint, coreset, data, evaluation, sampler
from hst.config import CycleConfig, TrainConfig
from hst.consolidate import consolidate_experts
from hst.params import read_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycle", required=True)
    ap.add_argument("--variants", nargs="+", default=["bottom-up", "top-down"], choices=["bottom-up", "top-down"])
    args = ap.parse_args()
    params = read_params("params.yaml")
    item = params["cycles"][args.cycle]
    tcfg, ccfg = TrainConfig(**params["consolidate"]), CycleConfig(**params["cycle"])
    _, sets = coreset.sets("experts", sampler.load_records(Path("cycles") / args.cycle / "buffer"),
                           sampler.read_buffer(f"indexes/{item['prev']}.parquet"), ccfg.min_new_data,
                           ccfg.new_old_ratio, ccfg.seed)
    start, meta = checkpoint.load(f"models/{item['prev']}.champion.pt")
    domains = [*meta["learned_domains"], item["domain"]]
    val = {d: data.load_tokens("data/prepared", d, "val") for d in domains}
    before = evaluation.evaluate_domains(start, val, ccfg.eval_windows)
    history = [{"name": "start", "bpb": {d: e.bpb for d, e in before.items()}}]
    print("| variant | avg forgetting | worst forgetting | absorption | routing stability | seconds |")
    print("| --- | --- | --- | --- | --- | --- |")
    variants = {"bottom-up": lambda m: consolidate_experts(m, sets, tcfg),
                "top-down": lambda m: consolidate_experts(m, sets[::-1], tcfg)}
    for name in args.variants:
        model, _ = checkpoint.load(f"models/{item['prev']}.champion.pt")
        t0 = time.perf_counter()
        variants[name](model)
        seconds = time.perf_counter() - t0
        r = evaluation.cycle_report(history, name, item["domain"], list(meta["learned_domains"]), before,
                                    evaluation.evaluate_domains(model, val, ccfg.eval_windows), model.n_experts)
        print(f"| {name} | {100 * r['avg_forgetting']:+.2f} % | {100 * r['worst_forgetting']:+.2f} % | "
              f"{r['absorption']:.3f} | {100 * r['routing_stability_mean']:.1f} % | {seconds:.0f} |")


if __name__ == "__main__":
    main()
