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
    assert layer["itjd"] == pytest.approx(1.0) and layer["rmi"] == pytest.approx(1.0)
    assert math.isclose(sum(layer["usage"]), 1.0)


def test_itjd_of_known_cover_sets():
    usage = {"a": torch.tensor([0.5, 0.5, 0, 0]), "b": torch.tensor([0, 0.5, 0.5, 0]),
             "c": torch.tensor([0, 0, 0, 1.0])}
    # sets {0,1}, {1,2}, {3}: distances 2/3, 1, 1
    assert metrics.itjd(usage, 0.9) == pytest.approx((2 / 3 + 1 + 1) / 3)
    assert metrics.itjd({"a": usage["a"]}) == 0.0


def test_rmi_is_one_for_disjoint_routing_and_zero_for_identical():
    a, b = torch.tensor([[0, 1]] * 10), torch.tensor([[2, 3]] * 10)
    assert metrics.rmi({"a": a, "b": b}, 4) == pytest.approx(1.0)
    assert metrics.rmi({"a": a, "b": a.clone()}, 4) == pytest.approx(0.0, abs=1e-12)


def test_rmi_hand_computed():
    # domain a: experts 0,0,0,1 ; domain b: experts 1,1,1,1 (slots of k=1)
    a, b = torch.tensor([[0], [0], [0], [1]]), torch.tensor([[1], [1], [1], [1]])
    joint = {("a", 0): 3 / 8, ("a", 1): 1 / 8, ("b", 1): 4 / 8}
    pd, pe = {"a": 0.5, "b": 0.5}, {0: 3 / 8, 1: 5 / 8}
    mi = sum(p * math.log(p / (pd[d] * pe[e])) for (d, e), p in joint.items())
    assert metrics.rmi({"a": a, "b": b}, 2) == pytest.approx(mi / math.log(2))


def test_routing_curve_flattens_per_layer_metrics():
    a = [torch.tensor([[0, 1]] * 10), torch.tensor([[0, 1]] * 10)]
    b = [torch.tensor([[2, 3]] * 10), torch.tensor([[0, 1]] * 10)]
    curve = metrics.routing_curve({"a": a, "b": b}, [4, 4])
    assert curve["itjd.layer0"] == pytest.approx(1.0) and curve["rmi.layer0"] == pytest.approx(1.0)
    assert curve["itjd.layer1"] == 0.0 and curve["rmi.layer1"] == pytest.approx(0.0, abs=1e-12)
    assert curve["eff_k.layer0"] == pytest.approx(4.0) and curve["eff_k.layer1"] == pytest.approx(2.0)


def test_skipped_slots_are_not_usage_and_experts_per_token_counts_run_slots():
    ids = torch.tensor([[0, -1, -1], [1, 0, -1], [2, 1, 0], [0, -1, -1]])
    assert torch.allclose(metrics.usage(ids, 4), torch.tensor([4, 2, 1, 0], dtype=torch.float64) / 7)
    assert metrics.experts_per_token(ids) == pytest.approx(7 / 4)
    assert metrics.experts_per_token(torch.tensor([[0, 1], [2, 3]])) == 2.0
    assert metrics.rmi({"a": torch.tensor([[0, -1]]), "b": torch.tensor([[1, -1]])}, 2) == pytest.approx(1.0)
    curve = metrics.routing_curve({"a": [ids], "b": [ids]}, [4])
    assert curve["experts_per_token.layer0"] == pytest.approx(7 / 4)
