import os

# One thread per process: the tests start many stage/DVC subprocesses (two at a time in places), and
# on 2 cores torch's default of one thread per core in each of them oversubscribes the CPU (the
# suite took 11.4 min with the default, see docs/decisions.md).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from hst.config import ModelConfig


torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_cfg():
    """A model small enough for sub-second tests."""
    return ModelConfig(seq_len=32, n_layer=2, n_head=2, d_model=32, n_experts=4, top_k=2, expert_hidden=16)
