"""The cycle report's arithmetic (hst/evaluation.py) on hand-made evaluations: forgetting against the
cycle's start and against the best row, absorption, transfer, routing stability, the R-matrix rows."""

import pytest
import torch

from hst import evaluation, sketches
from hst.evaluation import Evaluation, eval_windows
from hst.model import GPT


def ev(bpb: float, ids: list[list[int]] | None = None) -> Evaluation:
    return Evaluation(bpb, torch.tensor([bpb]), [None if ids is None else torch.tensor(ids)])


@pytest.mark.parametrize("f, label", [(0.0, "none"), (0.0199, "none"), (0.02, "mild"), (0.05, "mild"), (0.0501, "adjust")])
def test_forgetting_labels_follow_the_seeds_thresholds(f, label):
    assert evaluation.forgetting_label(f) == label


def test_routing_stability_compares_expert_sets_not_their_order():
    before = [torch.tensor([[0, 1], [2, 3], [1, 2], [0, 3]]), None]
    after = [torch.tensor([[1, 0], [2, 3], [1, 3], [3, 0]]), None]  # token 2 changed its set
    assert evaluation.routing_stability(before, after) == [0.75]  # the dense layer has none


def test_cycle_report_forgetting_absorption_transfer_and_matrix_rows():
    history = [{"name": "pretrain", "bpb": {"a": 2.0, "b": 3.0}},
               {"name": "c1", "bpb": {"a": 2.2, "b": 2.5}}]  # the start of this cycle
    before = {"a": ev(2.2, [[0, 1], [1, 2]]), "b": ev(2.5, [[2, 3], [0, 3]]), "new": ev(4.0, [[0, 1], [0, 1]])}
    after = {"a": ev(2.31, [[0, 1], [1, 3]]), "b": ev(2.25, [[3, 2], [0, 3]]), "new": ev(3.0, [[0, 1], [0, 2]])}
    r = evaluation.cycle_report(history, "c2", "new", ["a", "b"], before, after, [4])
    assert r["forgetting"] == pytest.approx({"a": 0.05, "b": -0.1})  # (after - before) / before
    assert r["forgetting_label"] == {"a": "mild", "b": "none"}
    # Against each domain's best row so far: a was best at pretraining (2.0), b at the start (2.5).
    assert r["forgetting_vs_best"] == pytest.approx({"a": 0.155, "b": -0.1})
    assert r["avg_forgetting"] == pytest.approx(-0.025) and r["worst_forgetting"] == pytest.approx(0.05)
    assert r["absorption"] == pytest.approx(1.0)  # the new domain's BPB drop
    assert r["backward_transfer"] == pytest.approx(((2.2 - 2.31) + (2.5 - 2.25)) / 2)
    assert r["forward_transfer"] == pytest.approx(8.0 - 4.0)
    # Routing stability over the old domains' tokens only: a's second token changed its set.
    assert r["routing_stability"] == [0.75] and r["routing_stability_mean"] == 0.75
    # The start row gains the new domain's BPB before the cycle, so R[i-1][i] is in the matrix.
    assert [row["name"] for row in r["history"]] == ["pretrain", "c1", "c2"]
    assert r["history"][1]["bpb"] == {"a": 2.2, "b": 2.5, "new": 4.0}
    assert r["history"][2]["bpb"] == {"a": 2.31, "b": 2.25, "new": 3.0}
    assert len(r["eff_k"]) == 1 and 1.0 <= r["eff_k"][0] <= 4.0


def test_a_dense_model_reports_no_routing():
    before = {"a": ev(2.0), "new": ev(4.0)}
    after = {"a": ev(2.1), "new": ev(3.5)}
    r = evaluation.cycle_report([{"name": "pretrain", "bpb": {"a": 2.0}}], "c1", "new", ["a"], before, after, [1])
    assert r["routing_stability"] == [] and r["routing_stability_mean"] is None and r["usage"] == []


def test_inference_cost_counts_the_passes_the_evaluation_spent(tiny_cfg):
    """The cost is read off the evaluation's own forward passes, weighted by windows: the same count as
    one forward over every window, with no second pass."""
    torch.manual_seed(0)
    model = GPT(tiny_cfg).eval()
    for layer in range(tiny_cfg.n_layer):
        model.add_expert(layer, torch.randn(tiny_cfg.d_model), "random", path=1)
    english, numbers = torch.tensor(list(b"the cat sat on the mat " * 40)), torch.tensor(list(b"0123 4567 89 " * 80))
    for text in (english, numbers):
        model.add_path_sketch(sketches.fit_sketch(text))
    model.inference = "select"
    val = {"english": english, "numbers": numbers[:300]}
    evals = evaluation.evaluate_domains(model, val, 3)
    cost = evaluation.inference_cost(model, evals)
    windows = torch.cat([eval_windows(t, tiny_cfg.seq_len, 3)[:, :-1] for t in val.values()])
    with torch.no_grad():
        whole = model(windows).passes
    assert 1 < cost["passes_per_token"] == pytest.approx(whole)  # numbers' windows run path 1 beside path 0's prefix
    assert cost["paths"] == 2 and cost["mode"] == "select"
    assert cost["mflops_per_token"] == pytest.approx(model.flops_per_token() * whole / 1e6)
