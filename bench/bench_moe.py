"""Throughput of HST's mixture of experts as the pool grows, and the Smart Sampler's cost, in one run.

Part 1, training steps (forward, backward, AdamW: ``hst.train.train_step``) of the default model
shape with E experts per layer, top_k fixed, for each E in ``--experts``:
  key      HST key router, sorted dispatch (the product path)
  learned  linear router, sorted dispatch
  naive    key router, the masked per-expert loop (``reference_dispatch``, HF-Mixtral style)
  grouped  key router, one ``torch._grouped_mm`` per expert matrix on weights stacked each call
  dense    one FFN with the same active width (top_k * expert_hidden); it does not depend on E
Part 2, the Smart Sampler at inference: serving records through the model (the forward passes
`collect` runs) with and without logging them (routing summary, surprise, Parquet buffer).

Variants run round-robin so drifts in machine load hit all of them alike; medians of the rounds
are reported. Writes a JSON (``--out``) and prints a Markdown table.

    python bench/bench_moe.py [--experts 8 16 64] [--steps 6] [--rounds 3] [--out docs/bench/moe.json]
    python bench/bench_moe.py --params presets/large.yaml --experts 64 --variants key dense --no-sampler
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

from hst import experts
from hst.config import ModelConfig, TrainConfig
from hst.data import encode
from hst.evaluation import eval_mode
from hst.model import GPT
from hst.params import load_section
from hst.router import SKIPPED
from hst.sampler import SmartSampler
from hst.train import make_optimizer, train_step


def grouped_dispatch(x, expert_ids, weights, pool):
    """``experts.dispatch`` with the per-expert loop replaced by two grouped GEMMs (dense experts only)."""
    n_tokens, k = expert_ids.shape
    flat = expert_ids.reshape(-1)
    order = flat.argsort(stable=True)
    order = order[int((flat == SKIPPED).sum()):]
    token = order // k
    offs = torch.bincount(flat[order], minlength=len(pool)).cumsum(0).to(torch.int32)
    up = torch.stack([e.up.weight for e in pool]).transpose(1, 2)  # (E, d, hidden)
    down = torch.stack([e.down.weight for e in pool]).transpose(1, 2)  # (E, hidden, d)
    h = F.relu(torch._grouped_mm(x.index_select(0, token), up.to(x.dtype), offs=offs)).square()
    ys = torch._grouped_mm(h, down.to(h.dtype), offs=offs) * weights.reshape(-1)[order, None].to(h.dtype)
    return ys.new_zeros(n_tokens, x.shape[1]).index_add_(0, token, ys)


VARIANTS = {"key": ("key", experts.dispatch), "learned": ("learned", experts.dispatch),
            "naive": ("key", experts.reference_dispatch), "grouped": ("key", grouped_dispatch),
            "dense": ("dense", experts.dispatch)}


def train_tokens_per_s(cfg: ModelConfig, dispatch, steps: int, batch: int) -> float:
    torch.manual_seed(0)
    model = GPT(cfg)
    tcfg = TrainConfig(batch_size=batch, update_keys=True)
    opt = make_optimizer(model, tcfg)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len))
    with mock.patch.object(experts, "dispatch", dispatch):
        for i in range(steps + 2):  # two warm-up steps
            if i == 2:
                t0 = time.perf_counter()
            train_step(model, opt, x, x, tcfg, None)
    return steps * batch * cfg.seq_len / (time.perf_counter() - t0)


def records(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct pseudo-text records of 256–2048 bytes (the prepare stage's record sizes)."""
    rng = random.Random(seed)
    words = ["the", "of", "and", "expert", "router", "token", "domain", "learn", "cycle", "shall", "def", "return"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(60, 480)))[:2048] for _ in range(n)]


@torch.no_grad()
def serve_seconds(model: GPT, texts: list[str], log: bool) -> float:
    """Seconds to serve ``texts`` through ``model``: the windows' forward passes, plus (``log``)
    the Smart Sampler's record (routing summary, surprise) and flush to a fresh buffer."""
    with tempfile.TemporaryDirectory() as tmp, eval_mode(model):
        t0 = time.perf_counter()
        if log:
            with SmartSampler(tmp) as smart:
                for text in texts:  # one request at a time, as a server logs them
                    smart.record(model, [text], "bench")
        else:
            for text in texts:
                tokens = encode([text]).long()
                for start in range(0, len(tokens), model.cfg.seq_len):
                    model(tokens[start:start + model.cfg.seq_len][None])
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 16, 64])
    ap.add_argument("--steps", type=int, default=6, help="timed training steps per variant and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--records", type=int, default=64, help="records served per Smart Sampler round")
    ap.add_argument("--sampler-rounds", type=int, default=7)
    ap.add_argument("--params", help="take the model shape from this params file (default: ModelConfig())")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--no-sampler", action="store_true", help="skip part 2")
    ap.add_argument("--out", help="JSON file for the results")
    args = ap.parse_args()
    base = load_section(args.params, "model", ModelConfig) if args.params else ModelConfig()

    rates: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name in args.variants:
            ffn, fn = VARIANTS[name]
            for n in args.experts if ffn != "dense" else [0]:
                cfg = dataclasses.replace(base, ffn=ffn, n_experts=n or base.n_experts)
                rates.setdefault(f"{name}@{n}", []).append(train_tokens_per_s(cfg, fn, args.steps, args.batch))
    train = {k: statistics.median(v) for k, v in rates.items()}

    lo, hi = min(args.experts), max(args.experts)
    pairs = {f"key/dense at E={lo}": (f"key@{lo}", "dense@0"), f"key E={hi} / E={lo}": (f"key@{hi}", f"key@{lo}"),
             f"key/naive at E={hi}": (f"key@{hi}", f"naive@{hi}"), f"grouped/key at E={hi}": (f"grouped@{hi}", f"key@{hi}")}
    result = {
        "setup": {"d_model": base.d_model, "n_layer": base.n_layer, "top_k": base.top_k,
                  "expert_hidden": base.expert_hidden, "batch": f"{args.batch}x{base.seq_len}",
                  "steps": args.steps, "rounds": args.rounds, "threads": torch.get_num_threads(),
                  "torch": torch.__version__},
        "train_tokens_per_s": train,
        "ratios": {k: train[a] / train[b] for k, (a, b) in pairs.items() if a != b and a in train and b in train},
    }
    if not args.no_sampler:
        torch.manual_seed(0)
        model, texts = GPT(base), records(args.records)
        seconds = {"serve": [], "serve_and_log": []}
        for _ in range(args.sampler_rounds):
            seconds["serve"].append(serve_seconds(model, texts, log=False))
            seconds["serve_and_log"].append(serve_seconds(model, texts, log=True))
        serve, logged = (statistics.median(seconds[k]) for k in ("serve", "serve_and_log"))
        result["sampler"] = {"records": args.records, "serve_s": serve, "serve_and_log_s": logged,
                             "logging_overhead": logged / serve - 1}
    print(table(result, args.experts))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def table(result: dict, n_experts: list[int]) -> str:
    train = result["train_tokens_per_s"]
    dense = train.get("dense@0")
    rows = [f"setup: {result['setup']}", "",
            "| variant | " + " | ".join(f"E = {n}" for n in n_experts) + " |",
            "| --- |" + " --- |" * len(n_experts)]
    for name in VARIANTS:
        if name == "dense" and dense:
            rows.append("| dense | " + " | ".join([f"{dense:.0f}"] * len(n_experts)) + " |")
        elif f"{name}@{n_experts[0]}" in train:
            cells = [f"{train[f'{name}@{n}']:.0f}" + (f" ({train[f'{name}@{n}'] / dense:.2f}x dense)" if dense else "")
                     for n in n_experts]
            rows.append(f"| {name} | " + " | ".join(cells) + " |")
    rows += ["", *(f"{k}: {v:.2f}" for k, v in result["ratios"].items())]
    if "sampler" in result:
        s = result["sampler"]
        rows.append(f"Smart Sampler: {s['records']} records served in {s['serve_s']:.2f} s, with logging "
                    f"{s['serve_and_log_s']:.2f} s: overhead {100 * s['logging_overhead']:+.1f} %")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
