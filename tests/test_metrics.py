import math

import pytest
import torch

from hst import metrics


def test_usage_counts_every_routed_slot():
    ids = torch.tensor([[0, 1], [0, 2], [0, 1]])
    assert metrics.usage(ids, 4).tolist() == pytest.approx([3 / 6, 2 / 6, 1 / 6, 0])


def test_eff_k_is_one_for_collapse_and_e_for_uniform():
    assert metrics.eff_k(torch.tensor([1.0, 0, 0, 0])) == pytest.approx(1.0)
    assert metrics.eff_k(torch.full((8,), 1 / 8)) == pytest.approx(8.0)
    assert metrics.eff_k(torch.tensor([0.5, 0.5, 0, 0])) == pytest.approx(2.0)


def test_total_variation_and_cover_sets():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.0, 0.2, 0.3, 0.5])
    assert metrics.total_variation(p, q) == pytest.approx(0.6)
    assert metrics.cover_set(p, 0.8) == {0, 1}
    assert metrics.cover_set(q, 0.8) == {3, 2}
    assert metrics.cover_set(p, 0.81) == {0, 1, 2}
    assert metrics.jaccard_distance({0, 1}, {1, 2}) == pytest.approx(1 - 1 / 3)


def test_specialization_of_disjoint_domains():
    a = [torch.tensor([[0, 1]] * 10)]
    b = [torch.tensor([[2, 3]] * 10)]
    (layer,) = metrics.specialization({"a": a, "b": b}, [4])
    assert layer["pairs"]["a|b"] == {"tv": pytest.approx(1.0), "jaccard": pytest.approx(1.0)}
    assert layer["eff_k"] == pytest.approx(4.0)
    assert layer["max_share"] == pytest.approx(0.25)
    assert layer["domains"]["a"]["eff_k"] == pytest.approx(2.0)
    assert math.isclose(sum(layer["usage"]), 1.0)
