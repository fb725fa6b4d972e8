"""Sparse experts on CPU: what the masks cost, and whether a real sparse kernel would be faster.

Part 1, one expert at the shapes of a real batch: the tokens one expert receives in a default
training batch (16 × 256 tokens × top-2 / 8 experts = 1024), d_model 256, expert_hidden 256:
  dense   the dense expert (density 1.0): two dense matmuls
  masked  ``hst.sparse.SparseLinear`` at --density: ``weight * mask``, then the same dense matmuls
          (the project's implementation)
  csr     the same connections as a ``torch.sparse`` CSR matrix: forward CSR @ dense, backward
          CSRᵀ @ dense for the input gradient and ``sampled_addmm`` for the live weights' gradient
  bsr     (forward only) block-sparse BSR, 16×16 blocks at the same density: a coarser mask than the
          model's, shown as the best case for a structured sparse kernel
forward + backward and forward alone (inference), milliseconds per call.
``to_sparse_semi_structured`` (2:4) is not measured: it runs on CUDA only and fixes density at 50 %.

Part 2, the full default model: training steps (forward, backward, AdamW) at density 1.0, at
--density with fixed masks, and at --density with topology tracking (the pretraining path).

Variants run round-robin and the median of the rounds is reported, so drifts in machine load hit
all of them alike; ratios are within this one run.

    python bench/bench_sparse.py [--density 0.05] [--rounds 5] [--steps 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F

from hst.config import ModelConfig, TrainConfig
from hst.experts import Expert
from hst.model import GPT
from hst.sparse import Topology, random_mask
from hst.train import make_optimizer, train_step


class CSRLinear(torch.autograd.Function):
    """``x @ Wᵀ`` for ``W`` (out, in) held in CSR; gradients for ``x`` and the live values only."""

    @staticmethod
    def forward(ctx, x, values, pattern, pattern_t, perm):
        w = torch.sparse_csr_tensor(pattern.crow_indices(), pattern.col_indices(), values, pattern.shape)
        ctx.save_for_backward(x, values)
        ctx.pattern, ctx.pattern_t, ctx.perm = pattern, pattern_t, perm
        return (w @ x.T).T

    @staticmethod
    def backward(ctx, gy):
        x, values = ctx.saved_tensors
        p, pt = ctx.pattern, ctx.pattern_t
        wt = torch.sparse_csr_tensor(pt.crow_indices(), pt.col_indices(), values[ctx.perm], pt.shape)
        gx = (wt @ gy.T).T
        gv = torch.sparse.sampled_addmm(p, gy.T, x, beta=0.0).values()  # (gyᵀ x) at the live positions
        return gx, gv, None, None, None


class CSRWeight:
    """A masked weight as CSR values plus the fixed patterns of W and Wᵀ."""

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor):
        self.pattern = (weight * mask).to_sparse_csr()
        pos = torch.full(mask.shape, -1, dtype=torch.long)
        pos[mask] = torch.arange(int(mask.sum()))
        self.perm = pos.T[mask.T]  # row-major order of Wᵀ's entries, as indices into W's values
        self.pattern_t = (weight * mask).T.contiguous().to_sparse_csr()
        self.values = weight[mask].clone().requires_grad_(True)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return CSRLinear.apply(x, self.values, self.pattern, self.pattern_t, self.perm)


def block_mask(shape: tuple[int, int], density: float, block: int = 16) -> torch.Tensor:
    blocks = random_mask((shape[0] // block, shape[1] // block), density)
    return blocks.repeat_interleave(block, 0).repeat_interleave(block, 1)


def expert_variants(d: int, hidden: int, density: float, tokens: int):
    torch.manual_seed(0)
    dense = Expert(d, hidden)
    dense.reset_parameters(0.02, 4)
    masked = Expert(d, hidden, density)
    masked.reset_parameters(0.02, 4)
    up, down = (CSRWeight(m.weight.detach(), m.mask) for m in (masked.up, masked.down))
    bsr_up, bsr_down = ((m.weight.detach() * block_mask(m.weight.shape, density)).to_sparse_bsr((16, 16))
                        for m in (masked.up, masked.down))
    x = torch.randn(tokens, d, requires_grad=True)
    csr = lambda x: down(F.relu(up(x)).square())  # noqa: E731
    bsr = lambda x: (bsr_down @ F.relu(bsr_up @ x.T).square()).T  # noqa: E731
    train = {"dense": dense, "masked": masked, "csr": csr}
    infer = {**train, "bsr": bsr}
    y_masked, y_csr = masked(x), csr(x)
    assert torch.allclose(y_masked, y_csr, atol=1e-5), "CSR expert disagrees with the masked expert"
    return x, train, infer


def ms_per_call(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def model_tokens_per_s(cfg: ModelConfig, every: int, steps: int, batch: int) -> float:
    torch.manual_seed(0)
    model = GPT(cfg)
    tcfg = TrainConfig(domains=("a",), steps=10**6, warmup_steps=0, precision="fp32", topology_every=every)
    opt = make_optimizer(model, tcfg)
    topology = Topology(model, opt, every, 0.1, "gradient", 10**6)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len))
    for i in range(steps + 1):  # one warm-up step
        if i == 1:
            t0 = time.perf_counter()
        train_step(model, opt, x, x, tcfg, None)
        topology.after_step(i + 1)
    return steps * batch * cfg.seq_len / (time.perf_counter() - t0)


def report(title: str, rates: dict[str, list[float]], base: str, unit: str, lower_is_better: bool) -> None:
    print(f"\n{title}")
    ref = statistics.median(rates[base])
    print(f"{'variant':24} {unit:>12} {'speed vs ' + base:>22}")
    for name, r in rates.items():
        med = statistics.median(r)
        ratio = ref / med if lower_is_better else med / ref
        print(f"{name:24} {med:12.3f} {ratio:21.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20, help="calls per round in part 1")
    ap.add_argument("--steps", type=int, default=5, help="training steps per round in part 2")
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    base = ModelConfig()
    tokens = args.batch * base.seq_len * base.top_k // base.n_experts
    x, train, infer = expert_variants(base.d_model, base.expert_hidden, args.density, tokens)
    print(f"density={args.density} d_model={base.d_model} expert_hidden={base.expert_hidden} tokens/expert={tokens} "
          f"batch={args.batch}x{base.seq_len} fp32 threads={torch.get_num_threads()} rounds={args.rounds}")

    fwd_bwd = {name: [] for name in train}
    fwd = {name: [] for name in infer}
    sparse_cfg = dataclasses.replace(base, expert_density=args.density)
    model = {"dense experts (1.0)": (base, 0), f"masked {args.density}, fixed": (sparse_cfg, 0),
             f"masked {args.density}, evolving": (sparse_cfg, 50)}
    tok_s = {name: [] for name in model}
    for _ in range(args.rounds):
        for name, f in train.items():
            fwd_bwd[name].append(ms_per_call(lambda: f(x).square().sum().backward(), args.reps))
        with torch.no_grad():
            for name, f in infer.items():
                fwd[name].append(ms_per_call(lambda: f(x), args.reps))
        for name, (cfg, every) in model.items():
            tok_s[name].append(model_tokens_per_s(cfg, every, args.steps, args.batch))
    report("one expert, forward + backward (ms per call)", fwd_bwd, "masked", "ms", True)
    report("one expert, forward only (ms per call)", fwd, "masked", "ms", True)
    report("full model training step (tokens/s)", tok_s, "dense experts (1.0)", "tokens/s", False)


if __name__ == "__main__":
    main()
