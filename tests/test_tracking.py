"""MLflow tracking against a temporary SQLite store (no server)."""

from pathlib import Path

import pytest

pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

from hst import tracking  # noqa: E402

REPORT = {"bpb": {"python": 2.0, "kjv": 1.5}, "forgetting": {"python": 0.01}, "avg_forgetting": 0.01,
          "worst_forgetting": 0.01, "absorption": 0.3, "backward_transfer": -0.02, "forward_transfer": 5.5,
          "routing_stability": [0.97, 0.95], "routing_stability_mean": 0.96, "experts_per_layer": [4, 5],
          "usage": [{"layer": 0, "itjd": 0.2, "rmi": 0.1, "eff_k": 3.5}, {"layer": 1, "itjd": 0.3, "rmi": 0.2, "eff_k": 3.1}],
          "novelty_rate": 0.25}


def _log(tmp: Path, uri: str, cycle: str, index: int, passed: bool, checkpoint: bytes, champion: bytes) -> dict:
    (tmp / f"{cycle}.pt").write_bytes(checkpoint)
    (tmp / f"{cycle}.champion.pt").write_bytes(champion)
    gate = {"passed": passed, "reasons": [] if passed else ["routing stability 50.00% < 90.00%"],
            "alarms": [], "champion": cycle if passed else "c1"}
    return tracking.log_cycle(uri, "scenario", "hst-test", "seq1", {"model": {"ffn": "key"}, "cycle": {"mode": "experts"}},
                              {"pretrain.train": [{"step": 1, "train_bpb": 7.0}, {"step": 2, "train_bpb": 6.0}]},
                              cycle, index, REPORT, gate, {"consolidate": [{"step": 1, "train_bpb": 3.0, "coreset": "L0_E1"}]},
                              [], tmp / f"{cycle}.pt", tmp / f"{cycle}.champion.pt", {"mlflow.source.git.commit": "abc"})


def test_cycles_are_child_runs_with_metrics_at_their_step_and_a_failed_gate_keeps_the_champion(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first = _log(tmp_path, uri, "c1", 1, True, b"model one", b"model one")
    second = _log(tmp_path, uri, "c2", 2, False, b"model two", b"model one")
    client = MlflowClient(uri, uri)
    assert first["parent_run_id"] == second["parent_run_id"]
    run = client.get_run(second["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == second["parent_run_id"]
    assert run.data.tags["gate"] == "failed" and "routing stability" in run.data.tags["gate.reasons"]
    expected = {"bpb.python", "bpb.kjv", "forgetting.python", "avg_forgetting", "worst_forgetting", "absorption",
                "routing_stability", "routing_stability.layer1", "itjd.layer0", "rmi.layer1", "eff_k.layer0",
                "experts.layer1", "novelty_rate", "consolidate.train_bpb"}
    assert expected <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(second["run_id"], "absorption")] == [2]
    assert [m.step for m in client.get_metric_history(first["parent_run_id"], "absorption")] == [1, 2]
    parent = client.get_run(first["parent_run_id"])
    assert parent.data.params["model.ffn"] == "key" and "pretrain.train.train_bpb" in parent.data.metrics
    # Both checkpoints are versions; the alias stayed on c1's when c2 failed its gate.
    versions = {v.version: v.tags["cycle"] for v in client.search_model_versions("name = 'hst-test'")}
    assert sorted(versions.values()) == ["c1", "c2"]
    champion = client.get_model_version_by_alias("hst-test", "champion")
    assert str(champion.version) == first["version"] == second["champion_version"] and champion.tags["cycle"] == "c1"
    assert (Path(champion.source) / "c1.pt").read_bytes() == b"model one"


def test_first_tracked_cycle_failing_registers_the_champion_it_started_from(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = _log(tmp_path, uri, "c2", 2, False, b"model two", b"model one")
    champion = MlflowClient(uri, uri).get_model_version_by_alias("hst-test", "champion")
    assert str(champion.version) == out["champion_version"] != out["version"]
    assert (Path(champion.source) / "c2.champion.pt").read_bytes() == b"model one"
