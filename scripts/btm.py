"""Dense branch-train-mix, the baseline that matches HST's paths (issue 31).

The "dense branches" point of ``scripts/pareto.py`` finetunes the dense pretraining once per cycle on
that cycle's domain (every cycle branches from the pretraining, none from the previous cycle). This
script evaluates the branches as one model, on every domain's evaluation windows:

- **posterior** (BTM / DEMix): the pretraining and every branch run, mixed by their posterior given
  the context — :func:`hst.paths.mix_paths`, what HST's default does with its paths; P dense models
  per token;
- **top-1** (c-BTM's flat-cost sibling): one branch per segment, chosen with HST's own rule
  (:mod:`hst.sketches`: byte n-gram sketches of each branch's training records, decisions at bytes
  8 / 32 / 96) — what ``grow.inference: select`` does with HST's paths; ~1 dense model per token;
- **top-1 + pretraining**: that branch mixed with the pretraining by their posterior, the pretraining
  dropped at a decision position once its weight is below ``hst.paths.PRUNE`` — what ``select_base``
  does with HST's paths; at most one more dense model per token, flat in the number of branches.

Branch p's sketch is fitted on its cycle's incoming records (``cycles/<c>/buffer``), the pretraining's
on the pretraining index's records (``indexes/pretrain.parquet``), one per domain, as HST's `learn` stage does. Run it
where the experiment's outputs are checked out:

    dvc exp apply pareto-dense-branches-1x
    python -m scripts.btm --out docs/runs/pareto_2threads/dense_branches_1x/btm.json   # committed
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow.parquet as pq
import torch

from hst import checkpoint, data, paths, sampler, sketches
from hst.evaluation import LN2, eval_windows
from hst.params import read_params


@torch.no_grad()
def evaluate(models: list, table: torch.Tensor, windows: torch.Tensor) -> dict:
    """BPB of the posterior mixture, of the top-1 selection and of each model alone on ``windows``
    (n, T + 1), and the selection's model passes per token."""
    idx, target = windows[:, :-1], windows[:, 1:]
    logits = torch.stack([m(idx).logits for m in models])  # (P, n, T, V)
    nll = lambda logp: float(-logp.gather(-1, target[..., None]).mean()) / LN2  # noqa: E731
    mixture, _ = paths.mix_paths(logits, idx)
    serving = paths.segment_paths(paths.sketch_scores(idx, table, len(models)))  # (n, S)
    chosen = torch.empty_like(target)  # (n, T) the model serving each position
    for s, (start, end) in enumerate(paths.segments(idx.shape[1])):
        chosen[:, start:end] = serving[:, s:s + 1]
    selected = logits.gather(0, chosen[None, ..., None].expand(1, *chosen.shape, logits.shape[-1]))[0]
    with_base, weights = paths.mix_paths(torch.stack([selected, logits[0]]), idx)
    pruned_at = paths.pruned(weights[1])  # as hst.selection.select decides, from the weights given bytes 1..d
    alone = torch.arange(idx.shape[1])[None] >= pruned_at[:, None]
    with_base = torch.where(alone[..., None], selected.log_softmax(-1), with_base)
    return {"posterior": nll(mixture), "top1": nll(selected.log_softmax(-1)), "top1_base": nll(with_base),
            "alone": [nll(lg.log_softmax(-1)) for lg in logits],
            "top1_passes_per_token": paths.relative_cost(serving, idx.shape[1]),
            "top1_base_passes_per_token": paths.relative_cost(serving, idx.shape[1], pruned_at)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--prepared", default="data/prepared")
    ap.add_argument("--windows", type=int, default=32, help="evaluation windows per domain (cycle.eval_windows)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    params = read_params(args.params)
    cycles = list(params["cycles"])
    models = [checkpoint.load("models/pretrain.champion.pt")[0].eval()]
    models += [checkpoint.load(f"models/{c}.pt")[0].eval() for c in cycles]
    index = pq.read_table("indexes/pretrain.parquet", columns=["text", "source"])  # the pretraining's: one per domain
    table = sketches.stack([sketches.fit_sketch(t) for t in sampler.tokens_by_source(index).values()]
                           + [sketches.fit_sketch(data.encode(sampler.load_records(f"cycles/{c}/buffer")["text"].to_pylist()))
                              for c in cycles])
    domains = [*params["pretrain"]["domains"], *(params["cycles"][c]["domain"] for c in cycles)]
    T = models[0].cfg.seq_len
    per_domain = {d: evaluate(models, table, eval_windows(data.load_tokens(args.prepared, d, "val"), T, args.windows))
                  for d in domains}
    mean = {k: sum(r[k] for r in per_domain.values()) / len(domains) for k in ("posterior", "top1", "top1_base")}
    passes = {k: sum(r[f"{k}_passes_per_token"] for r in per_domain.values()) / len(domains) for k in ("top1", "top1_base")}
    flops, params_one = models[0].flops_per_token() / 1e6, sum(p.numel() for p in models[0].parameters())
    result = {"models": ["pretrain", *cycles], "domains": domains, "per_domain": per_domain, "mean_bpb": mean,
              "inference_mflops_per_token": {"posterior": flops * len(models), **{k: flops * v for k, v in passes.items()}},
              "parameters": params_one * len(models)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("mean_bpb", "inference_mflops_per_token", "parameters")}, indent=2))


if __name__ == "__main__":
    main()
