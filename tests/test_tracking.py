"""MLflow tracking against temporary SQLite stores (no server): cycles, variants, the store's location."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

from hst import registry, runs, serving, tracking  # noqa: E402
from hst.config import ServeConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REPORT = {"bpb": {"python": 2.0, "kjv": 1.5}, "forgetting": {"python": 0.01}, "avg_forgetting": 0.01,
          "worst_forgetting": 0.01, "absorption": 0.3, "backward_transfer": -0.02, "forward_transfer": 5.5,
          "routing_stability": [0.97, 0.95], "routing_stability_mean": 0.96, "experts_per_layer": [4, 5],
          "usage": [{"layer": 0, "itjd": 0.2, "rmi": 0.1, "eff_k": 3.5}, {"layer": 1, "itjd": 0.3, "rmi": 0.2, "eff_k": 3.1}],
          "novelty_rate": 0.25}
PARAMS = {"model": {"ffn": "key"}, "cycle": {"mode": "experts"}, "tracking": {}}


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An initialised SQLite store: creating MLflow's tables takes seconds, copying them milliseconds."""
    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def uri(tmp_path, empty_store) -> str:
    """A fresh store in the test's folder."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path}/mlflow.db"


def _gate(cycle: str, passed: bool) -> dict:
    return {"passed": passed, "reasons": [] if passed else ["routing stability 50.00% < 90.00%"],
            "alarms": [], "champion": cycle if passed else "c1"}


def _log(tmp: Path, uri: str, cycle: str, index: int, passed: bool, checkpoint: bytes, champion: bytes,
         variant: str = "key-experts", report: dict = REPORT) -> dict:
    (tmp / f"{cycle}.pt").write_bytes(checkpoint)
    (tmp / f"{cycle}.champion.pt").write_bytes(champion)
    key = tracking.sequence_key(PARAMS, variant)
    out = tracking.log_cycle(uri, "scenario", variant, key, PARAMS,
                             {"pretrain.train": [{"step": 1, "train_bpb": 7.0}, {"step": 2, "train_bpb": 6.0}]},
                             cycle, index, report, _gate(cycle, passed),
                             {"consolidate": [{"step": 1, "train_bpb": 3.0, "coreset": "L0_E1"}]},
                             [], {"mlflow.source.git.commit": "abc"})
    return out | registry.register_cycle(uri, f"hst-{variant}", out["run_id"], cycle, tmp / f"{cycle}.pt",
                                         tmp / f"{cycle}.champion.pt", _gate(cycle, passed), PACKAGE)


def PACKAGE(checkpoint: Path, out: Path) -> None:
    serving.save_model(checkpoint, out, ServeConfig())


def test_cycles_are_child_runs_with_metrics_at_their_step_and_a_failed_gate_keeps_the_champion(tmp_path, uri):
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
    assert parent.info.status == "FINISHED"  # after every cycle, not RUNNING forever
    # The UI opens the experiment on its runs and charts, not on the GenAI traces page.
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    # Both checkpoints are versions; the alias stayed on c1's when c2 failed its gate.
    versions = {v.version: v.tags["cycle"] for v in client.search_model_versions("name = 'hst-key-experts'")}
    assert sorted(versions.values()) == ["c1", "c2"]
    champion = client.get_model_version_by_alias("hst-key-experts", "champion")
    assert str(champion.version) == first["version"] == second["champion_version"] and champion.tags["cycle"] == "c1"
    # The version is an MLflow model (what `mlflow models serve` loads) holding the checkpoint.
    assert (Path(champion.source) / "MLmodel").is_file()
    assert (Path(champion.source) / "artifacts/c1.pt").read_bytes() == b"model one"


def test_first_tracked_cycle_failing_registers_the_champion_it_started_from(tmp_path, uri):
    out = _log(tmp_path, uri, "c2", 2, False, b"model two", b"model one")
    champion = MlflowClient(uri, uri).get_model_version_by_alias("hst-key-experts", "champion")
    assert str(champion.version) == out["champion_version"] != out["version"]
    assert (Path(champion.source) / "artifacts/c2.champion.pt").read_bytes() == b"model one"


def test_variants_share_one_experiment_each_a_parent_run_drawing_a_line_across_cycles(tmp_path, uri):
    for variant, absorption in (("key-experts", [0.3, 0.2]), ("dense-full", [0.9, 0.8])):
        for index, (cycle, value) in enumerate(zip(("c1", "c2"), absorption), 1):
            _log(tmp_path, uri, cycle, index, True, variant.encode() + cycle.encode(), variant.encode() + cycle.encode(),
                 variant, REPORT | {"absorption": value})
    client = MlflowClient(uri, uri)
    (exp,) = [e for e in client.search_experiments() if e.name != "Default"]
    parents = client.search_runs([exp.experiment_id], "tags.`hst.role` = 'sequence'")
    assert sorted((p.info.run_name, p.data.tags["variant"]) for p in parents) == [
        ("dense-full", "dense-full"), ("key-experts", "key-experts")]
    lines = {p.info.run_name: [(m.step, m.value) for m in client.get_metric_history(p.info.run_id, "absorption")]
             for p in parents}
    assert lines == {"key-experts": [(1, 0.3), (2, 0.2)], "dense-full": [(1, 0.9), (2, 0.8)]}
    children = client.search_runs([exp.experiment_id], "tags.`hst.role` = 'cycle' and tags.variant = 'dense-full'")
    assert sorted(c.info.run_name for c in children) == ["dense-full: c1", "dense-full: c2"]
    # Each variant's checkpoints and champion alias live in its own registered model.
    assert {m.name for m in client.search_registered_models()} == {"hst-key-experts", "hst-dense-full"}
    assert client.get_model_version_by_alias("hst-dense-full", "champion").tags["cycle"] == "c2"


def test_a_relative_store_lies_in_the_project_dvc_runs_the_stage_for():
    env = {"DVC_ROOT": "/proj"}
    assert tracking.store_uri(env, Path("/proj/.dvc/tmp/exps/tmp1")) == "sqlite:////proj/mlflow.db"
    assert tracking.store_uri({**env, "MLFLOW_TRACKING_URI": "sqlite:///runs/m.db"}, Path("/x")) == "sqlite:////proj/runs/m.db"
    assert tracking.store_uri({}, Path("/work/p")) == "sqlite:////work/p/mlflow.db"
    for uri in ("sqlite:////abs/m.db", "http://host:5000"):
        assert tracking.store_uri({**env, "MLFLOW_TRACKING_URI": uri}, Path("/x")) == uri


def test_artifacts_stay_beside_the_store_when_a_temporary_copy_creates_the_experiment(tmp_path, uri, monkeypatch):
    store, copy = tmp_path, tmp_path / "copy"
    copy.mkdir()
    monkeypatch.chdir(copy)  # where `dvc exp run --temp` runs the stage
    (copy / "eval.json").write_text("{}")
    out = tracking.log_cycle(uri, "scenario", "v", "k", PARAMS, {}, "c1", 1, REPORT, _gate("c1", True), {},
                             [copy / "eval.json"], {})
    assert (store / "mlruns").is_dir() and not (copy / "mlruns").exists()
    assert Path(MlflowClient(uri).get_run(out["run_id"]).info.artifact_uri).is_relative_to(store / "mlruns")


def test_a_finished_run_loads_as_a_variant_once(tmp_path, uri):
    run_dir = tmp_path / "dense_finetune_1x"
    params = {**PARAMS, "model": {"ffn": "dense"}, "cycles": {"c1": {"domain": "kjv"}, "c2": {"domain": "german"}}}
    (run_dir / "eval").mkdir(parents=True), (run_dir / "gate").mkdir()
    (run_dir / "params.yaml").write_text(yaml.safe_dump(params))
    for i, cycle in enumerate(params["cycles"]):
        (run_dir / f"eval/{cycle}.json").write_text(json.dumps(REPORT | {"avg_forgetting": 0.1 * (i + 1)}))
        (run_dir / f"gate/{cycle}.json").write_text(json.dumps(_gate(cycle, True)))
    assert runs.track(str(run_dir), "dense finetune", uri) == ["c1", "c2"]
    assert runs.track(str(run_dir), "dense finetune", uri) == []
    client = MlflowClient(uri)
    (parent,) = client.search_runs([client.get_experiment_by_name("hst").experiment_id], "tags.`hst.role` = 'sequence'")
    assert parent.info.run_name == "dense finetune" and parent.data.params["model.ffn"] == "dense"
    assert [(m.step, m.value) for m in client.get_metric_history(parent.info.run_id, "avg_forgetting")] == [(1, 0.1), (2, 0.2)]


@pytest.mark.slow
def test_a_temporary_dvc_experiment_logs_into_the_original_project_as_its_own_variant(tmp_path):
    """`dvc exp run --temp -n NAME` runs `track` in a copy under .dvc/tmp; its cycle still lands in the project's
    store, in the same experiment as the workspace's run, as variant NAME."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "params.yaml").write_text(yaml.safe_dump(
        {"model": {"ffn": "key"}, "cycle": {"mode": "grow"}, "tracking": {}, "cycles": {"c1": {"domain": "kjv"}}}))
    (proj / "eval.json").write_text(json.dumps(REPORT))
    (proj / "gate.json").write_text(json.dumps(_gate("c1", True)))
    (proj / "c1.pt").write_bytes(b"model")
    (proj / ".gitignore").write_text("/mlflow.db\n/mlruns/\n")
    files = ["eval.json", "gate.json", "c1.pt"]
    (proj / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"track": {
        "cmd": "python -m stages.track --cycle c1 --eval eval.json --gate gate.json --checkpoint c1.pt "
               "--champion c1.pt --plots plots --metrics-dir metrics --pretrain-plots plots --out mlflow.json",
        "deps": files, "params": ["model", "cycle", "tracking"], "outs": [{"mlflow.json": {"cache": False}}]}}}))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {
        "PYTHONPATH": str(ROOT), "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    dvc = [sys.executable, "-m", "dvc"]
    for cmd in (["git", "init", "-q"], [*dvc, "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"],
                [*dvc, "exp", "run", "--temp", "-n", "dense-x", "-S", "model.ffn=dense"], [*dvc, "repro"]):
        proc = subprocess.run(cmd, cwd=proj, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    uri = f"sqlite:///{proj}/mlflow.db"
    client = MlflowClient(uri, uri)
    exp = client.get_experiment_by_name("hst")
    parents = client.search_runs([exp.experiment_id], "tags.`hst.role` = 'sequence'")
    assert sorted(p.data.tags["variant"] for p in parents) == ["dense-x", "key-grow"]
    assert {p.data.params["model.ffn"] for p in parents} == {"dense", "key"}
    assert Path(exp.artifact_location).is_relative_to(proj / "mlruns")
    for name in ("hst-dense-x", "hst-key-grow"):
        version = client.get_model_version_by_alias(name, "champion")
        assert (Path(version.source) / "artifacts/c1.pt").read_bytes() == b"model"


def test_a_server_that_answers_health_but_hangs_ends_the_logging_in_one_line(tmp_path, monkeypatch):
    import http.server
    import threading
    import time

    class Hanging(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            if self.path.endswith("/health"):
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"OK")
            else:
                time.sleep(30)  # the API never answers in time

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hanging)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for k, v in tracking.client_limits({"MLFLOW_HTTP_REQUEST_TIMEOUT": "1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}).items():
        monkeypatch.setenv(k, v)
    assert tracking.client_limits({})["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "30"  # the default bound
    start = time.monotonic()
    try:
        with pytest.raises(tracking.TrackingError, match="MLflow refused a request"):
            _log(tmp_path, f"http://127.0.0.1:{server.server_port}", "c1", 1, True, b"one", b"one")
    finally:
        server.shutdown()
    assert time.monotonic() - start < 20
