"""The Prefect flows under `prefect_test_harness` (temporary local API, no server, no network)."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-home-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from flows import continual_learning as cl  # noqa: E402
from project import ROOT, dvc_env, tiny_project  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_a_failing_stage_is_retried_then_fails_the_flow_naming_it(tmp_path, monkeypatch):
    params = {"flow": {"retries": 2, "retry_delay_seconds": 0}, "cycle": {}, "cycles": {"c1": {"domain": "kjv", "prev": "pretrain"}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    calls = []

    def fake_stage(project, target):
        calls.append(target)
        if target == "learn@c1":
            raise cl.StageFailed("learn@c1: error: cycles/c1/buffer: not a readable Smart Sampler buffer")
        return [target], [target]

    monkeypatch.setattr(cl, "run_stage", fake_stage)
    monkeypatch.setattr(cl.Pending, "of", classmethod(lambda cls, project: cls(frozenset(), {})))  # run everything
    state = cl.continual_learning(str(tmp_path), return_state=True)
    assert state.is_failed()
    assert "learn@c1: error: cycles/c1/buffer" in state.message
    assert calls == ["check_params", "prepare", "learned_pretrain", "pretrain", "gate_pretrain", "build_index_pretrain",
                     "learned@c1", "collect@c1"] + ["learn@c1"] * 3


def test_error_line_prefers_the_stage_message():
    assert cl.error_line("x\nerror: params.yaml:gate.max_forgetting: expected >= 0\nERROR: failed") == \
        "error: params.yaml:gate.max_forgetting: expected >= 0"
    assert cl.error_line("Traceback\nModuleNotFoundError: tqdm\nERROR: failed to reproduce") == "ModuleNotFoundError: tqdm"


@pytest.fixture(scope="module")
def flow_cycle(tmp_path_factory):
    """The tiny project with one cycle, run once by the flow, forced over the gate: the project, the
    final state, the MLflow store."""
    tmp = tmp_path_factory.mktemp("flow")
    proj = tiny_project(tmp / "proj")
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["cycles"] = {"c1": {"domain": "kjv", "prev": "pretrain"}}
    params["gate"]["min_routing_stability"] = 1.0  # growth always moves some routing
    # Every path mixed: the grown path then wins most old-domain tokens' routing too (stability < 90 %,
    # an alarm, which the flow must surface); the default's path 0 keeps most of it (97 % here).
    params["grow"]["inference"] = "mixture"
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    uri = f"sqlite:///{tmp}/mlflow.db"
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=proj, check=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        yield proj, cl.continual_learning(str(proj), return_state=True), uri


@pytest.mark.slow
def test_flow_runs_a_cycle_tracks_it_and_a_rejected_cycle_keeps_the_champion(flow_cycle, monkeypatch):
    from mlflow import MlflowClient

    proj, state, uri = flow_cycle
    assert state.is_completed(), state.message
    (result,) = state.result()
    assert not result["passed"] and result["champion"] == "pretrain"
    assert state.message.startswith("c1: rejected (routing stability") and "ALARM" in state.message
    assert state.name == "Completed with alarms"  # the run list shows the alarm
    assert (proj / "models/c1.champion.pt").read_bytes() == (proj / "models/pretrain.champion.pt").read_bytes()
    # The run page shows the decision as a table artifact.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as prefect_client:
        (artifact,) = prefect_client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    assert artifact.key == "gate-decisions" and artifact.type == "table"
    # A stage's progress bar reaches the run's logs while it runs (pretraining's, here).
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as prefect_client:
        logs = prefect_client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(
            any_=[state.state_details.flow_run_id])), limit=200)
    assert any("pretrain" in log.message and "%|" in log.message for log in logs)
    assert "rejected" in str(artifact.data) and "routing stability" in str(artifact.data)

    client = MlflowClient(uri, uri)
    run = client.get_run(result["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == result["parent_run_id"] and run.data.tags["gate"] == "failed"
    keys = {"bpb.kjv", "forgetting.python", "avg_forgetting", "worst_forgetting", "absorption", "routing_stability",
            "itjd.layer0", "rmi.layer1", "eff_k.layer0", "experts.layer1", "novelty_rate",
            "consolidate.train_bpb", "grow.train_bpb"}
    assert keys <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "avg_forgetting")] == [1]
    assert run.data.tags["dvc.models/c1.pt"] and run.data.tags["mlflow.source.git.commit"]
    champion = client.get_model_version_by_alias("tiny", "champion")
    assert champion.tags["cycle"] == "pretrain" and str(champion.version) == result["champion_version"]

    # A second run resumes: every stage is up to date, found by one status query (no `dvc` process),
    # and no new MLflow run appears.
    calls = []
    monkeypatch.setattr(cl, "run_dvc", lambda *args: calls.append(args))
    again = cl.continual_learning(str(proj), return_state=True)
    assert set(again.result()[0]["stages"].values()) == {"skipped"} and calls == []
    assert len(client.search_runs([run.info.experiment_id])) == 2  # the parent and c1


@pytest.mark.slow
def test_a_stage_runs_when_it_changed_or_a_stage_it_depends_on_ran(flow_cycle, tmp_path):
    proj = Path(shutil.copytree(flow_cycle[0], tmp_path / "proj", symlinks=True))
    assert cl.Pending.of(proj).changed == set()
    (proj / "params.yaml").write_text((proj / "params.yaml").read_text() + "# a comment\n")
    pending = cl.Pending.of(proj)  # as after an inbox drop: check_params reads the whole file
    assert pending.changed == {"check_params"}
    assert not pending.must_run("prepare", []) and pending.must_run("prepare", ["check_params"])
    (proj / "models/c1.pt").unlink()
    pending = cl.Pending.of(proj)
    assert pending.changed == {"check_params", "learn@c1", "evaluate@c1", "gate@c1", "track@c1"}
    assert pending.must_run("learn@c1", []) and not pending.must_run("build_index@c1", [])
    assert pending.must_run("build_index@c1", ["gate@c1"]) and pending.must_run("learn", []) and not pending.must_run("collect", [])
    assert pending.must_run("no_such_stage", [])  # DVC names the problem
    # check_params runs (params.yaml changed) but writes the same bytes: nothing downstream must run.
    assert cl.stage_task(str(proj), "check_params", True) == (["check_params"], [])


def paragraphs(word: str, n: int = 40) -> str:
    """Text that prepare can cut into records for every split."""
    return "\n\n".join(f"{word} {i} " * 40 for i in range(n))


def inbox_project(tmp_path, monkeypatch, min_bytes: int):
    """A project whose inbox flow records the continual_learning runs it would start instead of running them."""
    from prefect.states import Completed

    from flows import inbox as inbox_flow

    params = tmp_path / "params.yaml"
    params.write_text("# keep me\nprepare:\n  domains:\n    kjv: data/corpus/kjv.txt.gz\n"
                      "cycles:\n  c1_kjv: {domain: kjv, prev: pretrain}\n"
                      f"flow: {{inbox: data/inbox, min_inbox_bytes: {min_bytes}}}\n"
                      'tracking:\n  experiment: ""  # quoted\n')
    box = tmp_path / "data/inbox"
    box.mkdir(parents=True)
    runs = []
    monkeypatch.setattr(inbox_flow, "continual_learning",
                        lambda project, params, return_state: runs.append(project) or Completed(message="ran"))
    return inbox_flow, params, box, runs


def test_inbox_flow_turns_a_full_inbox_into_one_new_cycle(tmp_path, monkeypatch):
    inbox_flow, params, box, runs = inbox_project(tmp_path, monkeypatch, 20_000)
    first, second = paragraphs("first"), paragraphs("second")
    (box / "a.txt").write_text(first)
    waiting = len(first.encode())
    assert f"{waiting} of 20000 bytes waiting" in inbox_flow.inbox_flow(str(tmp_path), return_state=True).message
    (box / "b.txt").write_text(second)
    assert inbox_flow.inbox_flow(str(tmp_path), return_state=True).message == "ran"
    new = yaml.safe_load(params.read_text())
    assert new["cycles"]["c2_inbox1"] == {"domain": "inbox1", "prev": "c1_kjv"}
    assert new["prepare"]["domains"]["inbox1"] == "data/corpus/inbox/inbox1.txt"
    assert params.read_text().startswith("# keep me") and 'experiment: ""  # quoted' in params.read_text()
    assert (tmp_path / "data/corpus/inbox/inbox1.txt").read_text() == first + "\n\n" + second + "\n"
    (tmp_path / "metrics/gate").mkdir(parents=True)
    (tmp_path / "metrics/gate/c2_inbox1.json").write_text("{}")  # the cycle ran to its gate
    # The same files dropped again are not learned twice: no new cycle, no new run.
    (box / "a.txt").write_text(first)
    (box / "b.txt").write_text(second)
    assert "0 of 20000 bytes waiting" in inbox_flow.inbox_flow(str(tmp_path), return_state=True).message
    assert len(runs) == 1 and list(yaml.safe_load(params.read_text())["cycles"]) == ["c1_kjv", "c2_inbox1"]


def test_a_first_run_makes_the_inbox_and_a_claimed_cycle_that_never_ran_is_resumed(tmp_path, monkeypatch):
    inbox_flow, params, box, runs = inbox_project(tmp_path, monkeypatch, 20_000)
    box.rmdir()
    assert "0 of 20000 bytes waiting" in inbox_flow.inbox_flow(str(tmp_path), return_state=True).message
    assert box.is_dir() and runs == []
    (box / "a.txt").write_text(paragraphs("first") + paragraphs("second"))
    assert inbox_flow.inbox_flow(str(tmp_path), return_state=True).message == "ran"
    # That run died before the cycle finished (no gate report): the next run learns it, with nothing
    # waiting — unless another inbox run is learning right now.
    from hst import inbox as hst_inbox

    with hst_inbox.locked(box, name=hst_inbox.RUN_LOCK):
        assert "another inbox run" in inbox_flow.inbox_flow(str(tmp_path), return_state=True).message
    state = inbox_flow.inbox_flow(str(tmp_path), return_state=True)
    assert "resuming" not in state.message and state.message == "ran" and len(runs) == 2
    (tmp_path / "metrics/gate").mkdir(parents=True)
    (tmp_path / "metrics/gate/c2_inbox1.json").write_text("{}")
    assert "no new cycle" in inbox_flow.inbox_flow(str(tmp_path), return_state=True).message and len(runs) == 2


def test_inbox_never_follows_a_symlink_and_counts_only_what_it_would_accept(tmp_path, monkeypatch):
    inbox_flow, params, box, runs = inbox_project(tmp_path, monkeypatch, 20_000)
    secret = tmp_path / "secret.txt"
    secret.write_text(paragraphs("secret"))
    (box / "link.txt").symlink_to(secret)
    (box / "latin1.txt").write_bytes(paragraphs("Grüße").encode("latin-1"))  # above the threshold, not UTF-8
    (box / "sub").mkdir()
    (box / "sub/inner.txt").write_text(paragraphs("inner"))
    assert "0 of 20000 bytes waiting" in inbox_flow.inbox_flow(str(tmp_path), return_state=True).message
    ok = paragraphs("fine")
    (box / "ok.txt").write_text(ok)
    (box / "ok_copy.txt").write_text(ok)  # the same content twice counts once
    assert f"{len(ok.encode())} of 20000" in inbox_flow.inbox_flow(str(tmp_path), return_state=True).message
    (box / "more.txt").write_text(paragraphs("more"))
    assert inbox_flow.inbox_flow(str(tmp_path), return_state=True).message == "ran"
    corpus = (tmp_path / "data/corpus/inbox/inbox1.txt").read_text()
    assert "secret" not in corpus and "inner" not in corpus and "Gr" not in corpus and corpus.count("fine 0 ") == 40
    rejected = box / "processed/rejected"
    assert (rejected / "link.txt").is_symlink() and secret.read_text() == paragraphs("secret")  # moved, never read
    assert "not a regular file" in (rejected / "link.txt.reason").read_text()
    assert "not UTF-8" in (rejected / "latin1.txt.reason").read_text()
    assert (box / "processed/duplicates/ok_copy.txt").is_file() and (box / "sub/inner.txt").is_file()
    assert len(runs) == 1


def test_an_unsplittable_batch_is_rejected_before_it_reaches_params(tmp_path, monkeypatch):
    inbox_flow, params, box, runs = inbox_project(tmp_path, monkeypatch, 1000)
    before = params.read_text()
    (box / "one_line.txt").write_text("x" * 250_000)  # one record: prepare cannot fill val and test
    state = inbox_flow.inbox_flow(str(tmp_path), return_state=True)
    assert "batch rejected" in state.message and "too little text" in state.message
    assert params.read_text() == before and runs == []
    assert (box / "processed/rejected/inbox1/one_line.txt").stat().st_size == 250_000
    assert "too little text" in (box / "processed/rejected/inbox1/one_line.txt.reason").read_text()
    # The next good batch is learned normally.
    (box / "good.txt").write_text(paragraphs("good"))
    assert inbox_flow.inbox_flow(str(tmp_path), return_state=True).message == "ran"
    assert list(yaml.safe_load(params.read_text())["cycles"]) == ["c1_kjv", "c2_inbox1"]

def _take(project: str, barrier) -> tuple[list[str], str]:
    from flows.inbox import take_batch

    barrier.wait()
    return take_batch(Path(project), Path(project) / "params.yaml")


def test_concurrent_inbox_runs_claim_each_file_once(tmp_path, monkeypatch):
    import multiprocessing as mp

    _, params, box, _ = inbox_project(tmp_path, monkeypatch, 1000)
    texts = {f"f{i}.txt": paragraphs(f"file{i}", 10) for i in range(6)}
    for name, text in texts.items():
        (box / name).write_text(text)
    ctx = mp.get_context("spawn")
    barrier = ctx.Manager().Barrier(3)
    with ctx.Pool(3) as pool:
        results = pool.starmap(_take, [(str(tmp_path), barrier)] * 3)
    added = [keys for keys, _ in results if keys]
    assert added == [["c2_inbox1"]], results  # one run took the batch; the others found nothing waiting
    assert list(yaml.safe_load(params.read_text())["cycles"]) == ["c1_kjv", "c2_inbox1"]
    claimed = sorted(p.name for p in (box / "processed/inbox1").iterdir())
    assert claimed == sorted(texts) and not list(box.glob("*.txt"))  # all claimed, once, none lost
    assert {p.read_text() for p in (box / "processed/inbox1").iterdir()} == set(texts.values())


@pytest.mark.slow
def test_served_traffic_becomes_a_cycle_whose_champion_the_running_server_then_serves(tmp_path, monkeypatch):
    """serve -> requests -> the inbox flow harvests the served log -> a cycle learns it and passes its
    gate -> the same server process answers with the new champion (it follows the registry's alias)."""
    from flows.inbox import inbox_flow
    from hst.registry import md5
    from hst import serving

    proj = tiny_project(tmp_path / "proj")
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["cycles"] = {"c1": {"domain": "kjv", "prev": "pretrain"}}
    params["flow"] |= {"min_inbox_bytes": 5000}
    params["serve"] |= {"log_dir": "data/served", "flush_every": 8, "flush_seconds": 0.5, "reload_seconds": 1.0}
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=proj, check=True)
    assert cl.continual_learning(str(proj), return_state=True).is_completed()
    env = {**dvc_env(proj), "MLFLOW_TRACKING_URI": uri}
    env.pop("HST_SERVE_LOG_DIR", None)  # the log goes where params.yaml:serve.log_dir says
    proc, url = serving.start_server("models:/tiny@champion", proj, env)
    try:
        asked = [f"Served question {i}: " + "wie geht es dir heute, mein Freund? " * 8 for i in range(40)]
        for text in asked:
            status, body = serving.invoke(url, [{"text": text}])
            assert status == 200 and body["predictions"][0]["model"] == md5(proj / "models/c1.champion.pt")
        time.sleep(2)  # the log's last batch is written after flush_seconds
        state = inbox_flow(str(proj), return_state=True)
        assert state.is_completed(), state.message
        cycles = yaml.safe_load((proj / "params.yaml").read_text())["cycles"]
        assert list(cycles) == ["c1", "c2_inbox1"]
        corpus = (proj / "data/corpus/inbox/inbox1.txt").read_text()
        assert all(text in corpus for text in asked) and not list((proj / "data/served").glob("served-*.parquet"))
        assert json.loads((proj / "metrics/gate/c2_inbox1.json").read_text())["passed"]
        new = md5(proj / "models/c2_inbox1.champion.pt")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status, body = serving.invoke(url, [{"text": "and now?"}])
            if body["predictions"][0]["model"] == new:
                break
            time.sleep(0.5)
        assert body["predictions"][0]["model"] == new
    finally:
        serving.stop_server(proc)


def test_the_flow_runs_every_dvc_stage_in_an_order_the_dvc_graph_allows():
    # The stage order lives in two places: dvc.yaml's dependencies and the flow's START / CYCLE_STAGES.
    from dvc.repo import Repo
    cycles = list(yaml.safe_load((ROOT / "params.yaml").read_text())["cycles"])

    def position(stage) -> tuple[int, int]:
        group, _, item = stage.name.partition("@")
        if group in cl.START:
            return 0, cl.START.index(group)
        return 1 + cycles.index(item), cl.CYCLE_STAGES.index(group)

    graph = Repo(str(ROOT)).index.graph  # an edge runs from a stage to one it depends on
    assert {s.name.partition("@")[0] for s in graph.nodes} == set(cl.START) | set(cl.CYCLE_STAGES)
    late = [(a.name, b.name) for a, b in graph.edges if position(b) >= position(a)]
    assert not late, f"the flow runs these stages before what they depend on: {late}"
