"""Data-parallel training across processes started by ``torchrun``: the process group, which rank
writes, and the reductions that keep every rank's router state equal.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) :func:`setup` joins the process group
(NCCL on CUDA, gloo on CPU). Every rank draws the same global batch and trains on its own rows
(:func:`shard`), ``DistributedDataParallel`` averages the gradients, and the key router's EMA
statistics are summed over ranks, so N processes follow the single-process run up to float
rounding. Outside ``torchrun`` every function here is the single-process identity.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from hst.config import ConfigError


def setup(device: torch.device) -> int:
    """Join the ``torchrun`` process group if there is one; return the world size (1 without)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world_size()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes outputs (rank 0, or the only process)."""
    return rank() == 0


def shard(batch: torch.Tensor, batch_size: int) -> torch.Tensor:
    """This rank's contiguous share of a global batch's rows (all of them in one process)."""
    n = world_size()
    if batch_size % n:
        raise ConfigError(f"batch_size: {batch_size} sequences do not split evenly over {n} processes")
    per = batch_size // n
    return batch[rank() * per:(rank() + 1) * per]


def all_reduce_(*tensors: torch.Tensor, mean: bool = False) -> None:
    """Sum (or average) each tensor over ranks, in place; nothing in one process."""
    if not dist.is_initialized():
        return
    for t in tensors:
        dist.all_reduce(t)
        if mean:
            t /= dist.get_world_size()


def wrap(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` wrapped for gradient averaging across ranks (``model`` itself in one process).

    Experts that get no token on a rank contribute zero gradient there
    (``find_unused_parameters``); frozen parameters are not synchronised. Buffers are not
    broadcast: the router's keys stay equal because their updates are reduced (:func:`all_reduce_`).
    """
    if not dist.is_initialized():
        return model
    device = next(model.parameters()).device
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True,
                                                     broadcast_buffers=False)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
