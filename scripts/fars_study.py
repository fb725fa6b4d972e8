"""The FARS study (seed 000, table 4.2) on our corpus: router variants trained from scratch
with the same steps, data, seed and model size; per variant the validation BPB (the main loss),
Eff_K, RMI, ITJD, experts per token and active FLOPs per token.

    python scripts/fars_study.py            # trains the eight variants (~60 min on 2 CPU cores)
    python scripts/fars_study.py --table-only  # rebuild the table from docs/runs/fars_study/

Variants: learned top-k; learned Top-Any (the control that separates Top-Any from FARS); learned
Top-Any + FARS; learned Top-Any + FARS + task-ID consistency; the HST key router; the key router +
FARS; and learned Top-Any + FARS at the further λ of ``--sweep``. Everything else comes from
params.yaml (`model`, and `pretrain` for the optimizer and schedule); training uses every prepared
domain (the metrics need several labelled domains; pretraining proper uses two). Metrics are
measured on the validation splits after the last step, averaged over layers (per layer in the
JSON). Each variant's summary and validation curve go to ``--runs``, the table between the ``fars``
markers of ``--out``, and a figure of validation BPB and ITJD over training to ``--plot``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from hst import data, metrics  # noqa: E402
from hst.config import ModelConfig, TrainConfig  # noqa: E402
from hst.evaluation import evaluate  # noqa: E402
from hst.io import replace_section, write_json  # noqa: E402
from hst.model import GPT  # noqa: E402
from hst.params import build, read_params  # noqa: E402
from hst.train import train  # noqa: E402


def variants(fars: float, consistency: float, floor: float, sweep: list[float]) -> dict[str, tuple[dict, dict]]:
    """label -> (model overrides, training overrides); ``sweep``: extra λ for Top-Any + FARS."""
    top_any = {"ffn": "learned", "routing": "top_any", "router_floor": floor}
    return {
        "learned top-k": ({"ffn": "learned"}, {}),
        "learned Top-Any": (top_any, {}),
        "learned Top-Any + FARS": (top_any, {"fars_lambda": fars}),
        "learned Top-Any + FARS + consistency": (top_any, {"fars_lambda": fars, "consistency_lambda": consistency}),
        "key router (HST)": ({"ffn": "key"}, {}),
        "key router + FARS": ({"ffn": "key"}, {"fars_lambda": fars}),
        **{f"learned Top-Any + FARS, λ = {lam:g}": (top_any, {"fars_lambda": lam}) for lam in sweep},
    }


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def run_variant(label: str, mcfg: ModelConfig, tcfg: TrainConfig, prepared: str) -> tuple[dict, list[dict]]:
    train_streams = {d: data.load_tokens(prepared, d, "train") for d in tcfg.domains}
    val_streams = {d: data.load_tokens(prepared, d, "val") for d in tcfg.domains}
    torch.manual_seed(tcfg.seed)
    model = GPT(mcfg)
    t0 = time.perf_counter()
    curves = train(model, tcfg, train_streams, val_streams, desc=label)
    seconds = time.perf_counter() - t0
    final = {d: evaluate(model, t, tcfg.eval_windows) for d, t in val_streams.items()}
    layers = metrics.specialization({d: e.expert_ids for d, e in final.items()}, model.n_experts)
    per_layer = {k: [r[k] for r in layers] for k in ("eff_k", "rmi", "itjd", "experts_per_token")}
    summary = {
        "label": label,
        "model": dataclasses.asdict(mcfg),
        "train": dataclasses.asdict(tcfg),
        "val_bpb": {d: e.bpb for d, e in final.items()},
        "mean_val_bpb": sum(e.bpb for e in final.values()) / len(final),
        "per_layer": per_layer,
        **{k: sum(v) / len(v) for k, v in per_layer.items()},
        "flops_per_token": model.flops_per_token(per_layer["experts_per_token"]),
        "tokens_per_s": curves["tokens_per_s"],
        "train_seconds": seconds,
    }
    return summary, curves["val"]


def table(runs: list[dict], runs_dir: str) -> str:
    lines = ["| variant | val BPB (main loss) | Eff_K | RMI | ITJD | experts per token | active MFLOPs per token "
             "| tokens/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        lines.append(f"| {r['label']} | {r['mean_val_bpb']:.3f} | {r['eff_k']:.2f} | {r['rmi']:.3f} | {r['itjd']:.3f} "
                     f"| {r['experts_per_token']:.2f} | {r['flops_per_token'] / 1e6:.2f} | {r['tokens_per_s']:.0f} |")
    first = runs[0]
    fars = next(r["train"]["fars_lambda"] for r in runs if r["train"]["fars_lambda"] > 0)
    cons = next(r["train"]["consistency_lambda"] for r in runs if r["train"]["consistency_lambda"] > 0)
    floor = next(r["model"]["router_floor"] for r in runs if r["model"]["routing"] == "top_any")
    lines.append("")
    lines.append(f"{first['train']['steps']} steps × {first['train']['batch_size']} sequences of "
                 f"{first['model']['seq_len']} bytes on {', '.join(first['train']['domains'])}; "
                 f"{first['model']['n_experts']} experts per layer, top-k {first['model']['top_k']}; FARS λ = {fars:g} "
                 f"unless stated, consistency λ = {cons:g}, Top-Any floor {floor:g}; "
                 f"Eff_K / RMI / ITJD / experts per token: mean of the {first['model']['n_layer']} layers "
                 f"on the validation splits after the last step; per layer in `{runs_dir}/`.")
    return "\n".join(lines)


def figure(runs: list[dict], curves: dict[str, list[dict]], path: str) -> None:
    fig, (ax_bpb, ax_itjd) = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        rows = curves[r["label"]]
        domains = r["train"]["domains"]
        steps = [row["step"] for row in rows]
        ax_bpb.plot(steps, [sum(row[d] for d in domains) / len(domains) for row in rows], label=r["label"])
        n_layer = r["model"]["n_layer"]
        ax_itjd.plot(steps, [sum(row[f"itjd.layer{i}"] for i in range(n_layer)) / n_layer for row in rows],
                     label=r["label"])
    ax_bpb.set(xlabel="step", ylabel="mean validation BPB", title="Main loss")
    ax_itjd.set(xlabel="step", ylabel="ITJD (mean over layers)", title="Routing separation of domains")
    ax_itjd.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--prepared", default="data/prepared")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--fars-lambda", type=float, default=0.1)
    ap.add_argument("--consistency-lambda", type=float, default=0.1)
    ap.add_argument("--floor", type=float, default=0.1, help="Top-Any weight floor")
    ap.add_argument("--sweep", type=float, nargs="*", default=[0.01, 1.0],
                    help="further FARS λ for learned Top-Any + FARS (rows of their own)")
    ap.add_argument("--only", action="append", help="run only these variants (labels); may repeat")
    ap.add_argument("--table-only", action="store_true", help="rebuild table and figure from --runs")
    ap.add_argument("--runs", default="docs/runs/fars_study")
    ap.add_argument("--out", default="docs/results.md")
    ap.add_argument("--plot", default="docs/fars_study.png")
    args = ap.parse_args()

    params = read_params(args.params)
    runs, curves = [], {}
    grid = variants(args.fars_lambda, args.consistency_lambda, args.floor, args.sweep)
    for label, (model_over, train_over) in grid.items():
        path = Path(args.runs) / f"{slug(label)}.json"
        if not args.table_only and (not args.only or label in args.only):
            domains = data.prepared_domains(args.prepared)
            mcfg = build(ModelConfig, {**params["model"], **model_over}, "params.yaml:model")
            tcfg = build(TrainConfig, {**params["pretrain"], "domains": domains, "steps": args.steps,
                                       "eval_every": args.eval_every,
                                       "warmup_steps": min(params["pretrain"].get("warmup_steps", 0), args.steps),
                                       **train_over}, "params.yaml:pretrain")
            summary, val = run_variant(label, mcfg, tcfg, args.prepared)
            write_json(path, {**summary, "val_curve": val})
        if not path.is_file():
            raise SystemExit(f"error: {path}: no run of variant {label!r} (run without --table-only)")
        run = json.loads(path.read_text())
        curves[label] = run.pop("val_curve")
        runs.append(run)
    replace_section(args.out, "fars", table(runs, args.runs))
    figure(runs, curves, args.plot)


if __name__ == "__main__":
    main()
