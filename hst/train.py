"""The training loop: batches, AdamW with warmup + cosine, precision, validation BPB (:mod:`hst.evaluation`).

``train`` optimises whatever parameters of the model have ``requires_grad`` set, so the same loop
serves pretraining (everything) and targeted finetuning (one expert, the rest frozen). It trains on
``TrainConfig.device`` and, under ``torchrun``, data-parallel across the processes
(:mod:`hst.distributed`).
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager
from typing import Callable

import torch
from tqdm.auto import tqdm

from hst import distributed, sparse
from hst.config import HSTError, TrainConfig
from hst.data import DataError
from hst.evaluation import LN2, evaluate
from hst.fars import consistency_loss, expert_costs, fars_loss
from hst.metrics import routing_curve
from hst.model import GPT


class TrainingError(HSTError):
    """Training diverged (a NaN or infinite loss): stopped before anything is written."""


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision``: None means plain fp32.

    ``auto`` picks bf16 on a GPU that supports it, and on a CPU only where a bf16 matmul probe
    runs at least 1.25x faster than fp32: CPUs with bf16 instructions differ widely (1.6x faster
    on a Zen 4, 0.6x on the Xeon this project's CI uses), so the capability flag alone misleads.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if _cpu_bf16_speedup() >= 1.25 else None


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else the CPU; ``cuda`` without a GPU is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise HSTError("device: cuda requested but no CUDA device is available (use auto or cpu)")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a batch to ``device``; to a GPU from pinned memory, so the copy overlaps compute."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def _cpu_bf16_speedup(n: int = 1024, reps: int = 5) -> float:
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(2 * n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        seconds[dtype] = time.perf_counter() - t0
    return seconds[torch.float32] / seconds[torch.bfloat16]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def sample_batch(streams: list[torch.Tensor], batch_size: int, seq_len: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random windows; each row picks a stream uniformly, then a uniform offset in it.
    Returns inputs, targets and each row's stream index (its domain label)."""
    which = torch.randint(len(streams), (batch_size,), generator=gen)
    rows = []
    for s in which.tolist():
        start = int(torch.randint(len(streams[s]) - seq_len - 1, (1,), generator=gen))
        rows.append(streams[s][start:start + seq_len + 1])
    batch = torch.stack(rows).long()
    return batch[:, :-1], batch[:, 1:], which


@contextmanager
def only_trainable(model: GPT, experts: list[tuple[int, int]], also: list[torch.nn.Parameter] = ()):
    """Freeze every parameter except those of the ``(layer, expert)`` pairs and ``also``; restore the flags after."""
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in [q for layer, expert in experts for q in model.moe(layer).experts[expert].parameters()] + list(also):
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def make_optimizer(model: GPT, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters; weight decay on matrices except the embedding.

    The fused kernel updates all parameters in one pass: with 64 experts per layer the per-tensor
    loop spent 480 ms per step on the update alone, fused 46 ms (docs/decisions.md)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and not name.startswith("wte") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, fused=True)


def train_step(model: GPT, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               cfg: TrainConfig, amp: torch.dtype | None, domain: torch.Tensor | None = None,
               net: torch.nn.Module | None = None, path: int | None = None) -> float:
    """One optimizer step on a batch; returns the main loss in nats (without the routing-shaping
    terms). ``domain``: (B,) each row's domain, for the consistency loss; ``net``: what runs the
    forward pass (``model`` wrapped by :func:`hst.distributed.wrap`), by default ``model``, on ``path``
    (``GPT.forward``). A batch
    that reaches no trainable parameter (e.g. no token passes a new expert's gate), or whose loss is
    NaN/inf, leaves the model as it was (the caller stops on the latter)."""
    with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        out = (net or model)(x, y, update_keys=cfg.update_keys, path=path)
    loss = out.loss
    if not loss.requires_grad or not torch.isfinite(loss):
        return loss.item()
    if cfg.fars_lambda > 0:
        loss = loss + fars_loss(out.routing, expert_costs(model, opt, cfg.fars_norm), cfg.fars_lambda)
    if cfg.consistency_lambda > 0 and domain is not None:
        loss = loss + consistency_loss(out.routing, domain, cfg.consistency_lambda)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.item()


def train(model: GPT, cfg: TrainConfig, train_streams: dict[str, torch.Tensor],
          val_streams: dict[str, torch.Tensor], desc: str = "train",
          on_eval: Callable[[int, dict[str, float]], None] | None = None, path: int | None = None) -> dict:
    """Train ``model`` in place (on ``path``, ``GPT.forward``: growth trains one path alone); return the curves ``{"train": [...], "val": [...]}``, throughput
    and what topology evolution of sparse experts did (``topology``, see :mod:`hst.sparse`).

    ``train_streams``/``val_streams`` map a domain to its byte tokens. Validation runs every
    ``eval_every`` steps and after the last step. The model trains on ``cfg.device`` and is back on
    its own device when ``train`` returns. Under ``torchrun`` every process draws the same global
    batch and trains on its share of the rows; the curves hold the mean over processes.
    """
    home, device = next(model.parameters()).device, resolve_device(cfg.device)
    model.to(device)
    try:
        return _train(model, distributed.wrap(model), device, cfg, train_streams, val_streams, desc, on_eval, path)
    finally:
        model.to(home)


def _train(model: GPT, net: torch.nn.Module, device: torch.device, cfg: TrainConfig,
           train_streams: dict[str, torch.Tensor], val_streams: dict[str, torch.Tensor], desc: str,
           on_eval: Callable[[int, dict[str, float]], None] | None, path: int | None) -> dict:
    amp = autocast_dtype(cfg.precision, device)
    gen = torch.Generator().manual_seed(cfg.seed)
    for name, stream in {**train_streams, **val_streams}.items():
        if len(stream) <= model.cfg.seq_len + 1:
            raise DataError(f"domain {name!r}: {len(stream)} tokens, too few for windows of "
                            f"seq_len={model.cfg.seq_len} + 1")
    streams = [train_streams[d] for d in cfg.domains]
    opt = make_optimizer(model, cfg)
    curves = {"train": [], "val": []}
    tokens_seen, train_time = 0, 0.0
    model.train()
    with (tqdm(range(cfg.steps), desc=desc, mininterval=2.0, disable=not distributed.is_main()) as bar,  # closes cleanly on error
          sparse.evolving(model, opt, cfg.topology_every, cfg.topology_prune, cfg.topology_regrow,
                          cfg.steps, cfg.seed) as topology):
        for step in bar:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            x, y, domain = (to_device(distributed.shard(t, cfg.batch_size), device)
                            for t in sample_batch(streams, cfg.batch_size, model.cfg.seq_len, gen))
            loss = torch.tensor(train_step(model, opt, x, y, cfg, amp, domain, net, path), device=device)
            distributed.all_reduce_(loss, mean=True)
            bpb = loss.item() / LN2
            if not math.isfinite(bpb):
                raise TrainingError(f"{desc}: step {step + 1}: loss is {bpb} (training diverged; "
                                    f"lower the learning rate, now {lr:.3g}, or check the data)")
            topology.after_step(step + 1)
            train_time += time.perf_counter() - t0
            tokens_seen += x.numel() * distributed.world_size()
            curves["train"].append({"step": step + 1, "train_bpb": bpb, "lr": lr})
            bar.set_postfix(bpb=f"{bpb:.3f}", tok_s=f"{tokens_seen / train_time:.0f}", refresh=False)
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                evals = {d: evaluate(model, t, cfg.eval_windows, path=path) for d, t in val_streams.items()}
                val = {d: e.bpb for d, e in evals.items()}
                if evals and model.cfg.ffn != "dense":
                    val |= routing_curve({d: e.expert_ids for d, e in evals.items()}, model.n_experts)
                    _warn_collapse(val, step + 1, cfg.min_itjd, len(evals))
                curves["val"].append({"step": step + 1, **val})
                if on_eval:
                    on_eval(step + 1, val)
    curves["tokens_per_s"] = tokens_seen / train_time
    curves["precision"] = "bf16" if amp is not None else "fp32"
    curves["topology"] = topology.summary()
    return curves


def _warn_collapse(val: dict[str, float], step: int, min_itjd: float, n_domains: int) -> None:
    """Warn when routing stops separating the validation domains (seed 000: watch ITJD)."""
    low = {k: v for k, v in val.items() if k.startswith("itjd.") and v < min_itjd}
    if low and n_domains >= 2:
        warnings.warn(f"step {step}: ITJD below {min_itjd} ({', '.join(f'{k} {v:.2f}' for k, v in low.items())}): "
                      "routing is not separating the domains", RuntimeWarning, stacklevel=3)
