"""DVC stage `evaluate`: compare the checkpoints before and after a cycle on every domain it knows
(the learned ones and the new one: the directory ``learned@<cycle>`` wrote).

Writes the cycle's metrics (BPB row of the R matrix, forgetting per old domain against the start
of the cycle and against the best BPB it ever had, labels, absorption, routing stability on the old
domains' validation data, backward/forward transfer, experts per layer, novelty rate, Eff_K, what the
model spends per token at inference on these windows) and two PNGs: expert usage per domain and the forgetting matrix so far.
"""

from __future__ import annotations

import argparse

from hst import checkpoint, data, evaluation, plots
from hst.config import CycleConfig
from hst.io import read_json, write_json
from hst.params import load_section
from stages.common import cycle_domain, model_config, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--cycle", required=True)
    ap.add_argument("--before", required=True, help="checkpoint the cycle started from")
    ap.add_argument("--after", required=True, help="the cycle's final checkpoint")
    ap.add_argument("--history", required=True, help="evaluation JSON of the previous checkpoint")
    ap.add_argument("--grow", required=True, help="the cycle's grow metrics (novelty statistics)")
    ap.add_argument("--prepared", required=True)
    ap.add_argument("--out", required=True, help="this cycle's evaluation JSON (DVC metric)")
    ap.add_argument("--plots", required=True, help="directory for the PNGs")
    args = ap.parse_args()

    cfg, cycles = load_section(args.params, "cycle", CycleConfig), load_section(args.params, "cycles")
    domain = cycle_domain(cycles, args.cycle)
    expect = model_config(args.params)
    before, meta = checkpoint.load(args.before, expect)
    after, _ = checkpoint.load(args.after, expect)
    history = read_json(args.history, ("history",))["history"]
    val = {d: data.load_tokens(args.prepared, d, "val") for d in data.prepared_domains(args.prepared)}
    evals = evaluation.evaluate_domains(after, val, cfg.eval_windows)
    report = evaluation.cycle_report(
        history, args.cycle, domain, [d for d in meta["learned_domains"] if d != domain],
        evaluation.evaluate_domains(before, val, cfg.eval_windows), evals, after.n_experts)
    grown = read_json(args.grow, ("novel_record_share",))
    report["novelty_rate"] = grown["novel_record_share"]
    report["growth"] = grown.get("decision")  # grow.decide: novelty — which paths grew or consolidated
    report["inference"] = evaluation.inference_cost(after, evals)
    if report["usage"]:
        plots.usage_heatmap(report["usage"], f"{args.plots}/usage.png",
                            title=f"Expert usage after cycle {args.cycle} (new: {domain})")
    plots.forgetting_matrix(report["history"], f"{args.plots}/forgetting.png",
                            title=f"BPB change vs. first evaluation, through cycle {args.cycle}")
    write_json(args.out, report)


if __name__ == "__main__":
    run(main)
