"""Inference cost of growth paths (``grow.select: posterior``): forward tokens/s of the default model
shape as paths are added, each path ``grow.experts`` experts per layer (the mixture runs every path,
:func:`hst.model.mix_paths`), against the same model on one path (what a gated model runs).

Variants run round-robin so drifts in machine load hit all of them alike; medians of the rounds are
reported. Writes a JSON (``--out``) and prints a Markdown table.

    python bench/bench_paths.py [--paths 1 2 3 5] [--rounds 3] [--out docs/bench/paths.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

from hst.config import ModelConfig, build, load_params
from hst.model import GPT
from hst.router import Gate


def model_with_paths(cfg: ModelConfig, paths: int, experts: int) -> GPT:
    """The default model with ``paths - 1`` growth paths of ``experts`` (untrained) experts per layer."""
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    for path in range(1, paths):
        for layer in range(cfg.n_layer):
            router = model.moe(layer).router
            index = router.add_gate(Gate.linear(torch.zeros(cfg.d_model), 0.0, 0.0), path)
            for e in range(experts):
                model.add_expert(layer, router.keys[e % cfg.n_experts] + 0.01 * torch.randn(cfg.d_model), gate=index)
    return model


@torch.no_grad()
def tokens_per_s(model: GPT, idx: torch.Tensor, path: int | None, repeats: int) -> float:
    """Forward tokens/s of the mixture (``path`` None) or of one path, after one warm-up pass."""
    with contextlib.nullcontext() if path is None else model.on_path(path):
        model(idx)
        start = time.perf_counter()
        for _ in range(repeats):
            model(idx)
    return repeats * idx.numel() / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--paths", type=int, nargs="+", default=[1, 2, 3, 5])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="docs/bench/paths.json")
    args = ap.parse_args()
    model_sec, grow_sec = load_params(args.params, "model", "grow")
    cfg = build(ModelConfig, model_sec, "params.yaml:model")
    models = {p: model_with_paths(cfg, p, grow_sec.get("experts", 4)) for p in args.paths}
    idx = torch.randint(0, cfg.vocab_size, (args.batch, cfg.seq_len))
    runs: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for p, model in models.items():
            runs.setdefault(f"mixture@{p}", []).append(tokens_per_s(model, idx, None, args.repeats))
            runs.setdefault(f"one path@{p}", []).append(tokens_per_s(model, idx, p - 1, args.repeats))
    median = {k: statistics.median(v) for k, v in runs.items()}
    base = median[f"one path@{args.paths[0]}"]
    result = {"setup": {"d_model": cfg.d_model, "n_layer": cfg.n_layer, "batch": f"{args.batch}x{cfg.seq_len}",
                        "experts_per_path": grow_sec.get("experts", 4), "rounds": args.rounds,
                        "threads": torch.get_num_threads(), "torch": torch.__version__},
              "forward_tokens_per_s": median,
              "mixture_vs_one_path": {p: median[f"mixture@{p}"] / median[f"one path@{p}"] for p in args.paths},
              "one_path_vs_no_growth": {p: median[f"one path@{p}"] / base for p in args.paths}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| paths | mixture tokens/s | one path tokens/s | mixture ÷ one path |\n| --- | --- | --- | --- |")
    for p in args.paths:
        print(f"| {p} | {median[f'mixture@{p}']:,.0f} | {median[f'one path@{p}']:,.0f} | {result['mixture_vs_one_path'][p]:.2f} |")


if __name__ == "__main__":
    main()
