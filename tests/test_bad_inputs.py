"""Bad inputs to every stage of a finished tiny pipeline: each is one `error:` line naming the file
or key, exit code 2, and no output of the pipeline changes."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from hst import checkpoint
from project import dvc_env, error_line, tiny_project

OUTPUT_DIRS = ("data/prepared", "data/learned", "models", "cycles", "metrics", "plots")


def dvc(proj: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=proj, capture_output=True, text=True,
                          env=dvc_env(proj))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny project after `dvc repro` of one cycle, and every stage's command as dvc.yaml gives it."""
    proj = tiny_project(tmp_path_factory.mktemp("finished"))
    params = yaml.safe_load((proj / "params.yaml").read_text())
    del params["cycles"]["c2"]
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc(proj, "init", "--no-scm", "-q")
    done = dvc(proj, "repro")
    assert done.returncode == 0, done.stdout + done.stderr
    from dvc.repo import Repo

    with Repo(str(proj)) as repo:
        cmds = {s.name: s.cmd for s in repo.index.stages}
    return proj, cmds


def snapshot(proj: Path) -> dict[str, str]:
    """md5 of every output file (temporary files of a writer excluded: see ``leftovers``)."""
    return {str(p.relative_to(proj)): hashlib.md5(p.read_bytes()).hexdigest()
            for d in OUTPUT_DIRS for p in sorted((proj / d).rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(proj).parts)}


def leftovers(proj: Path) -> list[Path]:
    """Temporary siblings (``.<name>.<pid>.*``) under the output folders."""
    return [p for d in OUTPUT_DIRS for p in (proj / d).rglob(".*")]


def set_param(keys: str, value):
    def edit(proj: Path):
        params = yaml.safe_load((proj / "params.yaml").read_text())
        *path, last = keys.split(".")
        node = params
        for k in path:
            node = node[k]
        node[last] = value
        (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return edit


def write(rel: str, content: bytes | str):
    def edit(proj: Path):
        (proj / rel).parent.mkdir(parents=True, exist_ok=True)
        (proj / rel).write_bytes(content.encode() if isinstance(content, str) else content)
    return edit


def domain_file(name: str, content: bytes | str):
    """Point domain ``kjv`` at a new corpus file ``name`` holding ``content``."""
    def edit(proj: Path):
        write(f"data/corpus/{name}", content)(proj)
        set_param("prepare.domains.kjv", f"data/corpus/{name}")(proj)
    return edit


def parquet_without_text(proj: Path):
    pq.write_table(pa.table({"body": ["x" * 300] * 50}), proj / "data/corpus/kjv.parquet")
    set_param("prepare.domains.kjv", "data/corpus/kjv.parquet")(proj)


def edit_checkpoint(rel: str, change):
    """Rewrite the checkpoint ``rel`` after ``change(state)`` (a dict as ``checkpoint.save`` writes it)."""
    def edit(proj: Path):
        state = torch.load(proj / rel, weights_only=True)
        change(state)
        torch.save(state, proj / rel)
    return edit


def other_config(state):
    state["config"]["d_model"] = 64  # valid on its own, but not params.yaml:model


def fewer_expert_counts(state):
    state["n_experts"] = state["n_experts"][:1]


def drop_layer_weights(state):
    for k in [k for k in state["state_dict"] if k.startswith("blocks.1.")]:
        del state["state_dict"][k]


def more_experts_than_weights(state):
    state["n_experts"][0] += 1


def nan_weight(state):
    state["state_dict"]["lm_head.weight"][3, 3] = float("nan")


def old_format(state):
    state["format_version"] = 1


def truncate(rel: str):
    def edit(proj: Path):
        (proj / rel).write_bytes((proj / rel).read_bytes()[:1000])
    return edit


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def malicious(rel: str):
    def edit(proj: Path):
        torch.save({"format_version": 2, "payload": Evil()}, proj / rel)
    return edit


def remove(rel: str):
    def edit(proj: Path):
        p = proj / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return edit


def empty_dir(rel: str):
    def edit(proj: Path):
        shutil.rmtree(proj / rel)
        (proj / rel).mkdir()
    return edit


def json_without(rel: str, key: str):
    def edit(proj: Path):
        obj = json.loads((proj / rel).read_text())
        del obj[key]
        (proj / rel).write_text(json.dumps(obj))
    return edit


PARAGRAPHS = "\n\n".join(f"verse {i} " * 40 for i in range(200))

CASES = [
    # params.yaml, anywhere: the check stage reads the whole file
    ("check_params", set_param("cycle.lr", 0.1), "params.yaml:cycle: unknown key(s) ['lr']"),
    ("check_params", set_param("consolidation", {"lr": 0.1}), "params.yaml: unknown section(s) ['consolidation']"),
    ("check_params", set_param("cycles.c1.domain", "klingon"), "params.yaml:cycles.c1.domain: expected one of"),
    ("check_params", set_param("cycles.c1.prev", "c9"), "params.yaml:cycles.c1.prev: expected pretrain or an earlier"),
    ("check_params", write("params.yaml", "model: [unclosed\n"), "params.yaml:2: not valid YAML"),
    ("check_params", set_param("flow.retries", -1), "params.yaml:flow.retries: expected >= 0"),
    # params, read by the stage that uses them
    ("learn@c1", set_param("consolidate.lr", float("inf")), "params.yaml:consolidate.lr: expected finite float"),
    ("learn@c1", set_param("consolidate.lr", float("nan")), "params.yaml:consolidate.lr: expected finite float"),
    ("pretrain", set_param("pretrain.lr", -1.0), "params.yaml:pretrain.lr: expected > 0"),
    ("pretrain", set_param("model.d_model", "256"), "params.yaml:model.d_model: expected int, got str"),
    ("pretrain", set_param("pretrain.domains", ["klingon"]), "klingon/train.parquet: missing"),
    ("learn@c1", set_param("grow.gate_fpr", 1.5), "params.yaml:grow.gate_fpr: expected in (0, 1)"),
    ("gate@c1", set_param("gate.max_forgetting", float("nan")), "params.yaml:gate.max_forgetting: expected finite float"),
    ("prepare@kjv", set_param("prepare.test_fraction", 0.95), "val_fraction + test_fraction: expected < 1"),
    ("learn@c1", set_param("cycle.mode", "bogus"), "params.yaml:cycle.mode: expected one of"),
    ("build_index_pretrain", set_param("cycle.replay", "maybe"), "params.yaml:cycle.replay: expected one of"),
    ("collect@c1", set_param("model.top_k", 9), "params.yaml:model.top_k: expected 1..n_experts=4"),
    # checkpoints
    ("learn@c1", edit_checkpoint("models/pretrain.champion.pt", other_config),
     "pretrain.champion.pt: model config does not match params.yaml:model"),
    ("evaluate@c1", edit_checkpoint("models/c1.pt", fewer_expert_counts), "c1.pt: expert counts [5] do not fit"),
    ("evaluate@c1", edit_checkpoint("models/c1.pt", drop_layer_weights), "c1.pt: weights do not match the stored config"),
    ("learn@c1", edit_checkpoint("models/pretrain.champion.pt", more_experts_than_weights),
     "pretrain.champion.pt: weights do not match the stored config"),
    ("learn@c1", edit_checkpoint("models/pretrain.champion.pt", nan_weight),
     "pretrain.champion.pt: non-finite weights (lm_head.weight)"),
    ("evaluate@c1", edit_checkpoint("models/c1.pt", old_format), "c1.pt: not an HST checkpoint of format 7"),
    ("build_index_pretrain", truncate("models/pretrain.champion.pt"), "pretrain.champion.pt: not a readable checkpoint"),
    ("collect@c1", malicious("models/pretrain.champion.pt"), "pretrain.champion.pt: refused: holds objects other than"),
    ("gate@c1", remove("models/c1.pt"), "c1.pt: checkpoint not found"),
    # data
    ("prepare@kjv", domain_file("kjv.txt.gz", b"plain text, not gzip\n" * 100), "kjv.txt.gz: not a readable gzip file"),
    ("prepare@kjv", domain_file("kjv.txt", "Grüße\n\n".encode("latin-1") * 500), "kjv.txt: not UTF-8"),
    ("prepare@kjv", domain_file("kjv.txt", b""), "kjv.txt: no text"),
    ("prepare@kjv", domain_file("kjv.jsonl", '{"body": "x"}\n'), "kjv.jsonl:1: expected an object with a string field 'text'"),
    ("prepare@kjv", parquet_without_text, "kjv.parquet: not a readable Parquet file with column 'text'"),
    ("prepare@kjv", domain_file("kjv.txt", "x" * 250_000), "kjv.txt: too little text for a non-empty"),
    ("prepare@kjv", domain_file("kjv.csv", PARAGRAPHS), "kjv.csv: unsupported file type"),
    ("learn@c1", empty_dir("cycles/c1/buffer"), "cycles/c1/buffer: no Smart Sampler buffer files"),
    ("learn@c1", write("cycles/c1/buffer/buffer-000000.parquet", b"PAR1 broken"), "not a readable Smart Sampler buffer"),
    ("learn@c1", write("indexes/pretrain.parquet", b"garbage"), "pretrain.parquet: not a readable Smart Sampler buffer"),
    ("pretrain", remove("data/learned/pretrain/python/train.parquet"), "python/train.parquet: missing"),
    # reports written by earlier stages
    ("gate@c1", write("metrics/eval/c1.json", "{not json"), "metrics/eval/c1.json: not valid JSON"),
    ("gate@c1", json_without("metrics/eval/c1.json", "forgetting"), "metrics/eval/c1.json: missing key(s) ['forgetting']"),
    ("gate@c1", write("metrics/gate/pretrain.json", "[]"), "metrics/gate/pretrain.json: expected a JSON object"),
    ("evaluate@c1", write("metrics/eval/pretrain.json", ""), "metrics/eval/pretrain.json: not valid JSON"),
    ("evaluate@c1", json_without("metrics/cycles/c1/grow.json", "novel_record_share"),
     "grow.json: missing key(s) ['novel_record_share']"),
]


@pytest.fixture(scope="module")
def outcomes(finished, tmp_path_factory) -> list[dict]:
    """Every case run on its own copy of the finished project, two at a time (each stage run is
    seconds of imports)."""
    src, cmds = finished

    def one(case):
        target, edit, _ = case
        proj = tmp_path_factory.mktemp("case") / "proj"
        shutil.copytree(src, proj, symlinks=True, ignore=shutil.ignore_patterns(".dvc"))
        edit(proj)
        before = snapshot(proj)
        proc = subprocess.run(cmds[target], shell=True, cwd=proj, capture_output=True, text=True, env=dvc_env(proj))
        return {"proc": proc, "before": before, "after": snapshot(proj), "leftovers": leftovers(proj),
                "pwned": (proj / "pwned").exists()}

    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(one, CASES))


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{t}:{m[:40]}" for t, _, m in CASES])
def test_bad_input_is_one_line_exit_2_and_outputs_untouched(outcomes, i):
    out, message = outcomes[i], CASES[i][2]
    assert message in error_line(out["proc"])
    assert out["after"] == out["before"]
    assert not out["leftovers"] and not out["pwned"]


def test_an_unreachable_mlflow_server_is_one_line_after_a_bounded_wait(finished, tmp_path):
    src, cmds = finished
    proj = tmp_path / "proj"
    shutil.copytree(src, proj, symlinks=True, ignore=shutil.ignore_patterns(".dvc"))
    before = snapshot(proj)
    t0 = time.monotonic()
    proc = subprocess.run(cmds["track@c1"], shell=True, cwd=proj, capture_output=True, text=True,
                          env={**dvc_env(proj), "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    assert "http://127.0.0.1:9: MLflow tracking server not reachable" in error_line(proc)
    assert time.monotonic() - t0 < 60 and snapshot(proj) == before


def test_cases_cover_at_least_thirty_bad_inputs():
    assert len(CASES) + 1 >= 30


def test_unknown_key_fails_the_next_dvc_repro_before_anything_runs(finished, tmp_path):
    src, _ = finished
    proj = tmp_path / "proj"
    shutil.copytree(src, proj, symlinks=True)
    set_param("cycle.lr", 0.1)(proj)  # a key no stage names: DVC alone would not notice it
    before = snapshot(proj)
    proc = dvc(proj, "repro")
    assert proc.returncode != 0 and "params.yaml:cycle: unknown key(s) ['lr']" in proc.stdout + proc.stderr
    assert "Running stage 'prepare@" not in proc.stdout and snapshot(proj) == before


def test_kill_9_during_a_training_stage_leaves_no_leftovers_after_the_next_repro(finished, tmp_path):
    """kill -9 of the pretrain stage while it writes: every output keeps its previous version; the
    next `dvc repro` removes the killed writer's temp files and records consistent outputs."""
    src, _ = finished
    proj = tmp_path / "proj"
    shutil.copytree(src, proj, symlinks=True)
    set_param("pretrain.steps", 14)(proj)
    set_param("pretrain.eval_windows", 1500)(proj)  # seconds of evaluation between the first and last write
    before = snapshot(proj)
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "pretrain"], cwd=proj, env=dvc_env(proj),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    writing = lambda: [p for p in leftovers(proj) if "pretrain" in str(p.relative_to(proj))]  # noqa: E731 (not check_params')
    while time.monotonic() < deadline and not writing() and proc.poll() is None:
        time.sleep(0.05)
    stage_pids = [p for p in _children(proc.pid) if "stages.pretrain" in _cmdline(p)]
    assert stage_pids and writing(), "the stage finished before it could be killed while writing"
    os.kill(stage_pids[0], signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode != 0 and leftovers(proj)  # what a killed writer leaves behind ...
    assert snapshot(proj) == before  # ... beside outputs that all keep their previous version
    set_param("pretrain.eval_windows", 4)(proj)
    again = dvc(proj, "repro", "pretrain")
    assert again.returncode == 0, again.stdout + again.stderr
    assert not leftovers(proj)  # ... and the next run removes it
    assert "up to date" in dvc(proj, "status", "pretrain").stdout
    assert snapshot(proj) != before and checkpoint.load(proj / "models/pretrain.pt")[1]["train"]["steps"] == 14


@pytest.mark.parametrize("shell", ["/bin/sh", "bash"])
def test_killing_dvc_stops_the_stage_it_started(finished, tmp_path, shell):
    """DVC runs a command through $SHELL (or /bin/sh): bash execs it, dash waits for it, so with
    dash the stage's parent is the shell, which outlives dvc; the stage must stop either way."""
    src, _ = finished
    proj = tmp_path / "proj"
    shutil.copytree(src, proj, symlinks=True)
    set_param("pretrain.steps", 10**6)(proj)  # cannot finish by itself while the test waits
    env = {**dvc_env(proj), "SHELL": shutil.which(shell)}
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "pretrain"], cwd=proj, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill once the stage has torch mapped: it is then past `import stages` (which sets up the
    # watch), so the test does not depend on how fast an interpreter starts on a loaded machine.
    deadline = time.monotonic() + 120
    stage_pids = []
    while time.monotonic() < deadline and not stage_pids:
        stage_pids = [p for p in _children(proc.pid) if "stages.pretrain" in _cmdline(p) and _maps_torch(p)]
        time.sleep(0.2)
    assert stage_pids, "pretrain never started (or never loaded torch) under dvc repro"
    os.kill(proc.pid, signal.SIGKILL)  # dvc itself, not the stage
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_cmdline(p) for p in stage_pids):
        time.sleep(0.2)
    alive = [p for p in stage_pids if _cmdline(p)]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, "the stage outlived dvc"


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc)."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            kids = (task / "children").read_text().split() if (task / "children").is_file() else []
            out += map(int, kids)
            todo += map(int, kids)
    return out


def _maps_torch(pid: int) -> bool:
    """Whether the process has loaded torch's shared library."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    """The command line of a live process ('' when it is gone or a zombie)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        if "\nState:\tZ" in status:
            return ""
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
