import pytest
import torch

from hst.config import ModelConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_cfg():
    """A model small enough for sub-second tests."""
    return ModelConfig(seq_len=32, n_layer=2, n_head=2, d_model=32, n_experts=4, top_k=2, expert_hidden=16)
