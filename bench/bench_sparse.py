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
--density with fixed masks, at --density with topology tracking (the pretraining path), and with
every expert's masked weights swapped for the CSR version (fixed masks).

Every round times one call of every variant in turn (one training step in part 2), and the median
over rounds is reported, so drifts in machine load hit all variants alike; ratios are within this
one run.

    python bench/bench_sparse.py [--density 0.05] [--rounds 30]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from hst.config import ModelConfig, TrainConfig
from hst.experts import Expert
from hst.model import GPT
from hst.sparse import SparseLinear, Topology, random_mask
from hst.train import make_optimizer, train_step
from tqdm.auto import tqdm


class _CSRMatmul(torch.autograd.Function):
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


class CSRLinear(nn.Module):
    """A :class:`SparseLinear` as trainable CSR values with fixed patterns of W and Wᵀ."""

    def __init__(self, layer: SparseLinear):
        super().__init__()
        weight, mask = layer.weight.detach(), layer.mask
        self.pattern = (weight * mask).to_sparse_csr()
        self.pattern_t = (weight * mask).T.contiguous().to_sparse_csr()
        pos = torch.full(mask.shape, -1, dtype=torch.long)
        pos[mask] = torch.arange(int(mask.sum()))
        self.perm = pos.T[mask.T]  # row-major order of Wᵀ's entries, as indices into W's values
        self.values = nn.Parameter(weight[mask].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _CSRMatmul.apply(x, self.values, self.pattern, self.pattern_t, self.perm)


def to_csr(model: nn.Module) -> nn.Module:
    """Replace every expert's masked ``up``/``down`` by its CSR equivalent, in place."""
    for expert in [m for m in model.modules() if isinstance(m, Expert)]:
        expert.up, expert.down = CSRLinear(expert.up), CSRLinear(expert.down)
    return model


def block_mask(shape: tuple[int, int], density: float, block: int = 16) -> torch.Tensor:
    blocks = random_mask((shape[0] // block, shape[1] // block), density)
    return blocks.repeat_interleave(block, 0).repeat_interleave(block, 1)


def expert_variants(d: int, hidden: int, density: float, tokens: int):
    torch.manual_seed(0)
    dense = Expert(d, hidden)
    dense.reset_parameters(0.02, 4)
    masked = Expert(d, hidden, density)
    masked.reset_parameters(0.02, 4)
    csr = to_csr(copy.deepcopy(masked))
    bsr_up, bsr_down = ((m.weight.detach() * block_mask(m.weight.shape, density)).to_sparse_bsr((16, 16))
                        for m in (masked.up, masked.down))
    x = torch.randn(tokens, d, requires_grad=True)
    bsr = lambda x: (bsr_down @ F.relu(bsr_up @ x.T).square()).T  # noqa: E731
    train = {"dense": dense, "masked": masked, "csr": csr}
    infer = {**train, "bsr": bsr}
    g_masked = torch.autograd.grad(masked(x).square().sum(), [x, masked.up.weight])
    g_csr = torch.autograd.grad(csr(x).square().sum(), [x, csr.up.values])
    assert torch.allclose(masked(x), csr(x), atol=1e-5), "CSR expert disagrees with the masked expert"
    assert torch.allclose(g_masked[0], g_csr[0], atol=1e-5), "CSR input gradient disagrees"
    assert torch.allclose(g_masked[1][masked.up.mask], g_csr[1], atol=1e-5), "CSR weight gradient disagrees"
    return x, train, infer


def timed_ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


class ModelStep:
    """One model variant taking training steps (forward, backward, AdamW, topology tracking)."""

    def __init__(self, cfg: ModelConfig, every: int, csr: bool, batch: int):
        torch.manual_seed(0)
        self.model = to_csr(GPT(cfg)) if csr else GPT(cfg)
        self.cfg = TrainConfig(domains=("a",), steps=10**6, warmup_steps=0, precision="fp32", topology_every=every)
        self.opt = make_optimizer(self.model, self.cfg)
        self.topology = Topology(self.model, self.opt, every, 0.1, "gradient", 10**6)
        self.x = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len))
        self.steps = 0

    def __call__(self) -> None:
        train_step(self.model, self.opt, self.x, self.x, self.cfg, None)
        self.steps += 1
        self.topology.after_step(self.steps)


def report(title: str, values: dict[str, list[float]], base: str, unit: str, lower_is_better: bool) -> None:
    print(f"\n{title}")
    ref = statistics.median(values[base])
    print(f"{'variant':24} {unit:>12} {'speed vs ' + base:>28}")
    for name, v in values.items():
        med = statistics.median(v)
        print(f"{name:24} {med:12.2f} {(ref / med if lower_is_better else med / ref):27.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--rounds", type=int, default=30, help="each round times one call of every variant")
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")  # torch's "beta" notices
    base = ModelConfig()
    tokens = args.batch * base.seq_len * base.top_k // base.n_experts
    x, train, infer = expert_variants(base.d_model, base.expert_hidden, args.density, tokens)
    sparse_cfg = dataclasses.replace(base, expert_density=args.density)
    models = {"dense experts (1.0)": ModelStep(base, 0, False, args.batch),
              f"masked {args.density}, fixed": ModelStep(sparse_cfg, 0, False, args.batch),
              f"masked {args.density}, evolving": ModelStep(sparse_cfg, 50, False, args.batch),
              f"csr {args.density}, fixed": ModelStep(sparse_cfg, 0, True, args.batch)}
    calls = {**{("fwd_bwd", n): (lambda f=f: f(x).square().sum().backward()) for n, f in train.items()},
             **{("fwd", n): (lambda f=f: f(x).detach()) for n, f in infer.items()},
             **{("model", n): m for n, m in models.items()}}
    print(f"density={args.density} d_model={base.d_model} expert_hidden={base.expert_hidden} tokens/expert={tokens} "
          f"batch={args.batch}x{base.seq_len} fp32 threads={torch.get_num_threads()} rounds={args.rounds}")
    for fn in calls.values():  # warm-up
        fn()
    times = {key: [] for key in calls}
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for key, fn in calls.items():
            times[key].append(timed_ms(fn))
    report("one expert, forward + backward (ms per call)", {n: times[("fwd_bwd", n)] for n in train},
           "masked", "ms", True)
    report("one expert, forward only (ms per call)", {n: times[("fwd", n)] for n in infer}, "masked", "ms", True)
    step_tokens = args.batch * base.seq_len
    report("full model training step (tokens/s)",
           {n: [step_tokens / t * 1e3 for t in times[("model", n)]] for n in models},
           "dense experts (1.0)", "tokens/s", False)


if __name__ == "__main__":
    main()
