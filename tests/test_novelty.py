import pytest
import torch
import torch.nn.functional as F

from hst import novelty
from hst.router import gate_open


def test_auroc_matches_hand_counts():
    assert novelty.auroc([0.0, 1.0], [2.0, 3.0]) == 1.0
    assert novelty.auroc([2.0, 3.0], [0.0, 1.0]) == 0.0
    # pairs (pos, neg): (1,0) win, (1,2) loss, (2,0) win, (2,2) tie -> (2 + 0.5) / 4
    assert novelty.auroc([0.0, 2.0], [1.0, 2.0]) == 0.625
    with pytest.raises(ValueError):
        novelty.auroc([], [1.0])


def test_threshold_is_the_reference_quantile():
    assert novelty.threshold([float(i) for i in range(101)], 0.99) == pytest.approx(99.0)


def test_batches_and_the_m_consecutive_trigger():
    assert novelty.batch_shares([True, False, True, True, False], 2) == [0.5, 1.0, 0.0]
    assert novelty.first_trigger([0.6, 0.7, 0.8], 0.5, 3) == 2
    assert novelty.first_trigger([0.6, 0.4, 0.8, 0.9], 0.5, 3) is None
    assert novelty.first_trigger([0.6, 0.4, 0.8, 0.9, 0.7], 0.5, 3) == 4


def test_gate_separates_a_shifted_distribution_at_the_requested_false_positive_rate():
    torch.manual_seed(0)
    d, shift = 16, torch.zeros(16)
    shift[3] = 0.6
    held_in = F.normalize(torch.randn(64, 32, d), dim=-1)
    novel = F.normalize(torch.randn(64, 32, d) / 4 ** 0.5 + shift, dim=-1)
    gate = novelty.fit_gate(held_in, novel, fpr=0.02)
    fresh_held_in = F.normalize(torch.randn(64, 32, d), dim=-1)
    fresh_novel = F.normalize(torch.randn(64, 32, d) / 4 ** 0.5 + shift, dim=-1)
    assert gate_open(held_in, *gate).float().mean() == pytest.approx(0.02, abs=0.005)
    assert gate_open(fresh_held_in, *gate).float().mean() < 0.04
    assert gate_open(fresh_novel, *gate).float().mean() > 0.9
