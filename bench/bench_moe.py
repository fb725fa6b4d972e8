"""Training throughput of the FFN variants, measured in one run.

Compares, on the default model shape (params.yaml defaults), full training steps (forward,
backward, AdamW) of:
  key     HST key-routed MoE, sorted dispatch (the product path)
  naive   the same model with the masked per-expert loop (``reference_dispatch``)
  learned Linear-router MoE, sorted dispatch
  dense   one FFN with the same active width (top_k * expert_hidden)
Variants run round-robin so drifts in machine load hit all of them alike; the median of the
rounds is reported with ratios to ``key``.

    python bench/bench_moe.py [--steps 10] [--rounds 3] [--precision fp32]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from unittest import mock

import torch

from hst import experts
from hst.config import ModelConfig
from hst.model import GPT
from hst.train import autocast_dtype

VARIANTS = {"key": ("key", experts.dispatch), "naive": ("key", experts.reference_dispatch),
            "learned": ("learned", experts.dispatch), "dense": ("dense", experts.dispatch)}


def steps_per_s(model: GPT, steps: int, batch: int, amp) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, model.cfg.vocab_size, (batch, model.cfg.seq_len))
    t0 = None
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            loss = model(x, x, update_keys=True).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    args = ap.parse_args()
    amp = autocast_dtype(args.precision, torch.device("cpu"))
    base = ModelConfig()
    rates = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, (ffn, fn) in VARIANTS.items():
            torch.manual_seed(0)
            model = GPT(dataclasses.replace(base, ffn=ffn))
            with mock.patch.object(experts, "dispatch", fn):
                rates[name].append(steps_per_s(model, args.steps, args.batch, amp) * args.batch * base.seq_len)
    print(f"d_model={base.d_model} layers={base.n_layer} experts={base.n_experts} top_k={base.top_k} "
          f"expert_hidden={base.expert_hidden} batch={args.batch}x{base.seq_len} "
          f"precision={'bf16' if amp else 'fp32'} threads={torch.get_num_threads()}")
    key = statistics.median(rates["key"])
    print(f"{'variant':8} {'tokens/s':>10} {'vs key':>8}")
    for name, r in rates.items():
        med = statistics.median(r)
        print(f"{name:8} {med:10.0f} {med / key:8.2f}x")


if __name__ == "__main__":
    main()
