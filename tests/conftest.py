import os

# One thread per process: the suite runs on two xdist workers that start stage/DVC subprocesses
# (two at a time in places); torch's default of a thread per core in each would oversubscribe 2 cores.
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
