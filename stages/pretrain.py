"""DVC stage `pretrain`: train the model from scratch on the pretrain domains.

Writes the checkpoint, the metrics (final validation BPB per domain next to the unigram
baseline, routing specialisation), training curves for ``dvc plots`` and a PNG of expert usage per
domain and layer. Throughput goes to stderr only: every output is a function of the inputs, so a
re-run from scratch reproduces their hashes (wall time would differ on every run).

Under ``torchrun --nproc_per_node N -m stages.pretrain ...`` the N processes train data-parallel
(``hst.distributed``) and rank 0 alone evaluates and writes the outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from hst import checkpoint, data, distributed, metrics, plots
from hst.config import ConfigError, ModelConfig, TrainConfig
from hst.evaluation import evaluate
from hst.io import write_csv, write_json
from hst.model import GPT
from hst.params import load_section
from hst.train import resolve_device, train
from stages.common import run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--prepared", required=True, help="directory of prepared domains (the pretraining ones)")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--metrics", required=True, help="JSON summary (DVC metric)")
    ap.add_argument("--routing", required=True, help="JSON expert usage per layer and domain (DVC metric)")
    ap.add_argument("--plots", required=True, help="directory for curves (CSV) and routing.png")
    ap.add_argument("--eval", required=True, help="JSON: BPB on every domain in --prepared (row 0 of the R matrix)")
    args = ap.parse_args()

    mcfg = load_section(args.params, "model", ModelConfig)
    tcfg = load_section(args.params, "pretrain", TrainConfig)
    if not tcfg.domains:
        raise ConfigError("params.yaml:pretrain.domains: expected at least one domain")
    train_streams = {d: data.load_tokens(args.prepared, d, "train") for d in tcfg.domains}
    val_streams = {d: data.load_tokens(args.prepared, d, "val") for d in tcfg.domains}

    distributed.setup(resolve_device(tcfg.device))
    torch.manual_seed(tcfg.seed)
    model = GPT(mcfg)
    t0 = time.perf_counter()
    curves = train(model, tcfg, train_streams, val_streams, desc="pretrain")
    wall = time.perf_counter() - t0
    writer = distributed.is_main()
    distributed.teardown()
    if not writer:
        return
    print(f"pretrain: {tcfg.steps} steps in {wall:.1f} s, {curves['tokens_per_s']:,.0f} tokens/s "
          f"({torch.get_num_threads()} threads per process)", file=sys.stderr)

    final = {d: evaluate(model, t, tcfg.eval_windows) for d, t in val_streams.items()}
    val_bpb = {d: e.bpb for d, e in final.items()}
    # How much the last 20% of steps still improved validation BPB (from the eval nearest 80%).
    at80 = min(curves["val"], key=lambda r: abs(r["step"] - 0.8 * tcfg.steps))
    summary = {
        "val_bpb": val_bpb,
        "unigram_bpb": {d: data.unigram_bpb(train_streams[d], val_streams[d]) for d in tcfg.domains},
        "last20_improvement": {d: at80[d] - val_bpb[d] for d in tcfg.domains},
        "precision": curves["precision"],
        "params": sum(p.numel() for p in model.parameters()),
    }
    if mcfg.expert_density < 1:  # sparse experts: what prune-and-regrow did
        summary["topology"] = curves["topology"]
    routing = {}
    if mcfg.ffn != "dense":
        ids = {d: e.expert_ids for d, e in final.items()}
        routing = {"layers": metrics.specialization(ids, model.n_experts)}
        summary["routing"] = {f"layer{r['layer']}": {
            "max_share": r["max_share"], "eff_k": r["eff_k"], "itjd": r["itjd"], "rmi": r["rmi"],
            "mean_tv": _mean([p["tv"] for p in r["pairs"].values()]),
            "mean_jaccard": _mean([p["jaccard"] for p in r["pairs"].values()])}
            for r in routing["layers"]}
        plots.usage_heatmap(routing["layers"], f"{args.plots}/routing.png",
                            title=f"Expert usage after pretraining ({mcfg.ffn} router)")

    all_bpb = {d: val_bpb[d] if d in val_bpb else evaluate(model, data.load_tokens(args.prepared, d, "val"),
                                                                 tcfg.eval_windows).bpb
               for d in data.prepared_domains(args.prepared)}
    checkpoint.save(args.checkpoint, model, {"stage": "pretrain", "train": dataclasses.asdict(tcfg),
                                             "learned_domains": list(tcfg.domains), "consumed": []})
    write_json(args.eval, {"name": "pretrain", "history": [{"name": "pretrain", "bpb": all_bpb}]})
    write_csv(f"{args.plots}/train.csv", curves["train"])
    write_csv(f"{args.plots}/val.csv", curves["val"])
    write_json(args.routing, routing)
    write_json(args.metrics, summary)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


if __name__ == "__main__":
    run(main)
