"""The stage CLIs on tiny inputs: outputs, one-line errors, artifacts left intact; and `dvc repro`
(end to end, twice from scratch: same bytes)."""

import ast
import gzip
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from flows.continual_learning import out_hashes
from hst import checkpoint, data, sampler, sketches
from hst.config import ModelConfig
from hst.model import GPT

from project import DOMAINS, ROOT, TINY_MODEL, dvc_env, error_line, prepare, stage, tiny_project

def imported_modules(path: Path) -> set[str]:
    """Project modules (``hst/x.py``, ``stages/x.py``) a file imports, directly or through them."""
    seen, todo = set(), [path]
    while todo:
        for node in ast.walk(ast.parse(todo.pop().read_text())):
            names = ([f"{node.module}.{a.name}" if node.module == "hst" else node.module for a in node.names]
                     if isinstance(node, ast.ImportFrom) and node.module else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                rel = name.replace(".", "/") + ".py"
                if name.startswith(("hst.", "stages.")) and (ROOT / rel).is_file() and rel not in seen:
                    seen.add(rel)
                    todo.append(ROOT / rel)
    return seen


def test_every_stage_depends_on_exactly_the_code_it_imports():
    """Narrow, honest deps: editing tracking or plotting code retrains nothing that does not import it."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, st in stages.items():
        st = st.get("do", st)
        script = next(d for d in st["deps"] if d.startswith("stages/") and d != "stages/common.py")
        code = {d for d in st["deps"] if d.startswith(("hst", "stages/"))}
        assert code == {script} | imported_modules(ROOT / script), name
    assert not any("hst/tracking.py" in st.get("do", st)["deps"] for n, st in stages.items() if n != "track")


def test_nothing_outside_stages_imports_a_stage():
    """Flows, scripts and benchmarks share code through hst/, never through a stage's CLI module."""
    for path in [*ROOT.glob("flows/*.py"), *ROOT.glob("scripts/*.py"), *ROOT.glob("bench/*.py")]:
        bad = sorted(m for m in imported_modules(path) if m.startswith("stages/"))
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
        assert "from scripts" not in path.read_text() and "import scripts" not in path.read_text(), path


def test_prepare_writes_splits_and_manifest(tmp_path):
    proj = tiny_project(tmp_path)
    assert prepare(proj).returncode == 0
    for name in DOMAINS:
        splits = json.loads((proj / f"metrics/prepare/{name}.json").read_text())
        assert set(splits) == {"train", "val", "test"}
        assert splits["train"]["bytes"] > 5 * splits["val"]["bytes"] > 0
        assert (proj / f"data/prepared/{name}/val.parquet").is_file()


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["prepare"].update(val_fractoin=0.1), "unknown key(s) ['val_fractoin']"),
    (lambda p: p["prepare"].update(val_fraction="0.1"), "prepare.val_fraction: expected finite float"),
    (lambda p: p["prepare"]["domains"].update(legal="data/corpus/legal.txt"), "legal.txt: file not found"),
])
def test_prepare_bad_input_is_one_line_and_leaves_outputs(tmp_path, edit, message):
    proj = tiny_project(tmp_path)
    assert prepare(proj).returncode == 0
    before = (proj / "data/prepared/python/train.parquet").read_bytes()
    params = yaml.safe_load((proj / "params.yaml").read_text())
    edit(params)
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    assert message in error_line(prepare(proj))
    assert (proj / "data/prepared/python/train.parquet").read_bytes() == before


def test_prepare_non_utf8_domain_file(tmp_path):
    proj = tiny_project(tmp_path)
    (proj / "data/corpus/python.txt").write_bytes("Grüße aus Köln\n\n".encode("latin-1") * 100)
    assert "python.txt: not UTF-8" in error_line(prepare(proj))


def test_prepare_names_an_unknown_domain(tmp_path):
    proj = tiny_project(tmp_path)
    proc = stage(proj, "prepare", "--domain", "klingon", "--out", "data/prepared/klingon", "--manifest", "m.json")
    assert "params.yaml:prepare.domains: expected a key 'klingon'" in error_line(proc)


def test_learned_is_the_previous_directory_plus_the_new_domain(tmp_path):
    proj = tiny_project(tmp_path)
    assert prepare(proj).returncode == 0
    for d in ("shakespeare", "python"):  # one stage per pretraining domain, side by side
        assert stage(proj, "learned", "--domain", f"data/prepared/{d}", "--out", "data/learned/pretrain").returncode == 0
    c1 = ("--base", "data/learned/pretrain", "--out", "data/learned/c1")
    assert stage(proj, "learned", *c1, "--domain", "data/prepared/kjv").returncode == 0
    assert data.prepared_domains(proj / "data/learned/c1") == ["kjv", "python", "shakespeare"]
    for d in ("kjv", "python"):
        for split in data.SPLITS:
            rel = f"{d}/{split}.parquet"
            assert (proj / "data/learned/c1" / rel).read_bytes() == (proj / "data/prepared" / rel).read_bytes()
    # A domain learned again is copied once; the directory is replaced whole.
    assert stage(proj, "learned", *c1, "--domain", "data/prepared/python").returncode == 0
    assert data.prepared_domains(proj / "data/learned/c1") == ["python", "shakespeare"]
    bad = stage(proj, "learned", *c1, "--domain", "data/prepared/klingon")
    assert "data/prepared/klingon: not a prepared domain (missing train.parquet" in error_line(bad)
    assert data.prepared_domains(proj / "data/learned/c1") == ["python", "shakespeare"]


def test_pretrain_writes_a_self_describing_checkpoint(tmp_path):
    proj = tiny_project(tmp_path)
    assert prepare(proj).returncode == 0
    proc = stage(proj, "pretrain", "--prepared", "data/prepared", "--checkpoint", "models/pretrain.pt",
                 "--metrics", "metrics/pretrain.json", "--routing", "metrics/pretrain_routing.json",
                 "--plots", "plots/pretrain", "--eval", "metrics/eval/pretrain.json")
    assert proc.returncode == 0, proc.stderr
    model, meta = checkpoint.load(proj / "models/pretrain.pt")
    assert model.n_experts == [4, 4] and meta["stage"] == "pretrain"
    summary = json.loads((proj / "metrics/pretrain.json").read_text())
    assert set(summary["val_bpb"]) == {"shakespeare", "python"}
    assert set(summary["routing"]) == {"layer0", "layer1"}
    assert (proj / "plots/pretrain/routing.png").read_bytes()[:4] == b"\x89PNG"
    val = (proj / "plots/pretrain/val.csv").read_text().splitlines()
    assert val[0].startswith("step,shakespeare,python,itjd.layer0,rmi.layer0,eff_k.layer0") and len(val) == 3


def test_pretrain_rejects_unknown_model_key(tmp_path):
    proj = tiny_project(tmp_path)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["model"]["experts"] = 3
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    assert "params.yaml:model: unknown key(s) ['experts']" in error_line(
        stage(proj, "pretrain", "--prepared", "x", "--checkpoint", "y", "--metrics", "z",
              "--routing", "r", "--plots", "p", "--eval", "e"))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny project with prepared data and a pretrained checkpoint."""
    proj = tiny_project(tmp_path_factory.mktemp("proj"))
    assert prepare(proj).returncode == 0
    proc = stage(proj, "pretrain", "--prepared", "data/prepared", "--checkpoint", "models/pretrain.pt",
                 "--metrics", "metrics/pretrain.json", "--routing", "metrics/pretrain_routing.json",
                 "--plots", "plots/pretrain", "--eval", "metrics/eval/pretrain.json")
    assert proc.returncode == 0, proc.stderr
    return proj


def collect(proj, ckpt, out, params):
    return stage(proj, "collect", "--params", str(params), "--cycle", "c1", "--checkpoint", ckpt,
                 "--prepared", "data/prepared", "--out", out)


def test_collect_never_consumes_a_record_twice(pretrained, tmp_path):
    proj = pretrained
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["cycle"]["incoming_records"] = 10
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert collect(proj, "models/pretrain.pt", str(tmp_path / "b1"), tmp_path / "params.yaml").returncode == 0
    first = sampler.load_records(tmp_path / "b1")
    assert first.num_rows == 10 and set(first["source"].to_pylist()) == {"kjv"}
    # The model that learned cycle 1 lists its records as consumed; the next cycle skips them.
    model, meta = checkpoint.load(proj / "models/pretrain.pt")
    checkpoint.save(tmp_path / "after_c1.pt", model, {**meta, "consumed": first["record_id"].to_pylist()})
    assert collect(proj, str(tmp_path / "after_c1.pt"), str(tmp_path / "b2"), tmp_path / "params.yaml").returncode == 0
    second = set(sampler.load_records(tmp_path / "b2")["record_id"].to_pylist())
    assert len(second) == 10 and not second & set(first["record_id"].to_pylist())
    all_ids = [data.record_id(r) for r in data.load_records(proj / "data/prepared", "kjv", "train")]
    checkpoint.save(tmp_path / "all.pt", model, {**meta, "consumed": all_ids})
    proc = collect(proj, str(tmp_path / "all.pt"), str(tmp_path / "b3"), tmp_path / "params.yaml")
    assert "no incoming records for domain 'kjv'" in error_line(proc)


def test_learn_reports_a_corrupt_buffer_in_one_line(pretrained, tmp_path):
    (tmp_path / "buf").mkdir()
    (tmp_path / "buf/buffer-000000.parquet").write_bytes(b"PAR1 broken")
    proc = stage(pretrained, "learn", *learn_args("c1", "models/pretrain.pt", str(tmp_path / "buf"),
                                                  str(tmp_path / "i.parquet"), str(tmp_path)))
    assert "buffer-000000.parquet: not a readable Smart Sampler buffer" in error_line(proc)
    assert not (tmp_path / "final.pt").exists() and not (tmp_path / "grow.json").exists()


def learn_args(cycle: str, start: str, buffer: str, index: str, out: str) -> tuple[str, ...]:
    """The `learn` stage's arguments for ``cycle``, its outputs in folder ``out`` (final.pt, grow.json, ...)."""
    return ("--cycle", cycle, "--checkpoint", start, "--buffer", buffer, "--index", index, "--out", f"{out}/final.pt",
            *(arg for kind, ext in (("metrics", "json"), ("curves", "csv")) for step in ("consolidate", "grow")
              for arg in (f"--{step}-{kind}", f"{out}/{step}.{ext}")))


@pytest.mark.slow
def test_dvc_repro_runs_the_pipeline_reproducibly_and_then_is_a_no_op(tmp_path):
    proj, twin = tiny_project(tmp_path / "a"), tiny_project(tmp_path / "b")
    dvc = [sys.executable, "-m", "dvc"]
    env = dvc_env(proj)
    for p in (proj, twin):
        subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=p, check=True, env=dvc_env(p))
        params = yaml.safe_load((p / "params.yaml").read_text())
        params["cycle"]["mode"] = "grow"  # the default cycle: novelty decides whether a path grows or consolidates
        (p / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # Determinism: a second copy from scratch, side by side (one thread each), must write the same
    # bytes. Every stage of the first cycle but `track`, whose receipt holds the MLflow run ids its
    # store assigns: the first cycle's index needs every kind of stage (the second repeats them).
    log = tmp_path / "b.log"  # a file, not a pipe nobody reads while the first run goes on
    with log.open("w") as out:
        second = subprocess.Popen([*dvc, "repro", "build_index@c1"], cwd=twin, env=dvc_env(twin),
                                  stdout=out, stderr=subprocess.STDOUT)
        first = subprocess.run([*dvc, "repro"], cwd=proj, capture_output=True, text=True, env=env)
        assert first.returncode == 0, first.stdout + first.stderr
        assert second.wait() == 0, log.read_text()
    a, b = ({(name, path): md5 for name, outs in out_hashes(p).items() if not name.startswith("track@")
             for path, md5 in outs} for p in (proj, twin))
    assert {("pretrain", "models/pretrain.pt"), ("gate@c2", "models/c2.champion.pt"),
            ("build_index@c2", "indexes/c2.parquet")} <= set(a)
    assert ("build_index@c1", "indexes/c1.parquet") in b and set(b) <= set(a), set(b) - set(a)
    assert {name.partition("@")[0] for name, _ in b} >= {"learned", "collect", "learn", "evaluate", "gate"}
    differ = [out for out in b if a[out] != b[out]]
    assert not differ, f"outputs that differ between two runs of the same project: {differ}"
    assert (proj / "models/pretrain.pt").is_file() and (proj / "dvc.lock").is_file()
    # Two chained cycles ran; no grown path explained either domain, so each grew a path of one expert a layer.
    c1, c2 = (json.loads((proj / f"metrics/eval/{c}.json").read_text()) for c in ("c1", "c2"))
    decisions = [json.loads((proj / f"metrics/cycles/{c}/grow.json").read_text())["decision"] for c in ("c1", "c2")]
    assert [d["grown_path"] for d in decisions] == [1, 2] and not any(d["consolidated"] for d in decisions)
    assert c2["inference"]["paths"] == 3 and c2["inference"]["mode"] == "select_base"
    assert [r["name"] for r in c2["history"]] == ["pretrain", "c1", "c2"]
    assert c1["old_domains"] == ["shakespeare", "python"] and c2["old_domains"] == ["shakespeare", "python", "kjv"]
    assert c1["experts_per_layer"] == [5, 5] and c2["experts_per_layer"] == [6, 6]
    c2_model = checkpoint.load(proj / "models/c2.pt")[0]
    assert c2_model.n_experts == [6, 6] and c2_model.moe(0).router.expert_path.tolist() == [0, 0, 0, 0, 1, 2]
    assert list(c2_model.path_heads) == ["1", "2"]  # each grown path trained an output head of its own
    assert (proj / "plots/cycles/c2/forgetting.png").is_file() and (proj / "plots/cycles/c2/usage.png").is_file()
    dag = subprocess.run([*dvc, "dag", "--md"], cwd=proj, capture_output=True, text=True, env=env).stdout
    assert "learn@c1" in dag and "evaluate@c2" in dag
    second = subprocess.run([*dvc, "repro"], cwd=proj, capture_output=True, text=True, env=env)
    assert second.returncode == 0 and "didn't change" in second.stdout, second.stdout
    assert "Running stage" not in second.stdout
    # A fresh clone has the lock and metrics but neither the MLflow store nor track's run ids (not in
    # git): `dvc repro` logs every cycle into the new store, and only the track stages run.
    assert_store_holds_cycles(proj, ["c1", "c2"])
    shutil.rmtree(proj / "mlruns")
    (proj / "mlflow.db").unlink()
    for c in ("c1", "c2"):
        (proj / f"metrics/cycles/{c}/mlflow.json").unlink()
    fresh = subprocess.run([*dvc, "repro"], cwd=proj, capture_output=True, text=True, env=env)
    assert set(re.findall(r"Running stage '([^']+)'", fresh.stdout)) == {"track@c1", "track@c2"}, fresh.stdout
    assert_store_holds_cycles(proj, ["c1", "c2"])
    # Appending a cycle with a new domain runs that domain's prepare and the new cycle's stages only
    # (and the params check, which reads the whole file).
    text = gzip.decompress((ROOT / "data/corpus/manpages.txt.gz").read_bytes())[:60_000]
    (proj / "data/corpus/manpages.txt").write_bytes(text[:text.rfind(b"\n\n")])
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["prepare"]["domains"]["manpages"] = "data/corpus/manpages.txt"
    params["cycles"]["c3"] = {"domain": "manpages", "prev": "c2"}
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = subprocess.run([*dvc, "repro"], cwd=proj, capture_output=True, text=True, env=env)
    assert third.returncode == 0, third.stdout + third.stderr
    ran = set(re.findall(r"Running stage '([^']+)'", third.stdout))
    c3 = {f"{s}@c3" for s in ("learned", "build_index", "collect", "learn", "evaluate", "gate", "track")}
    assert ran == {"check_params", "prepare@manpages", *c3}, third.stdout
    c3_eval = json.loads((proj / "metrics/eval/c3.json").read_text())
    assert sorted(c3_eval["bpb"]) == ["german", "kjv", "manpages", "python", "shakespeare"]
    # The start row gained the new domain's BPB before the cycle (R[2][3]); earlier rows are unchanged.
    assert c3_eval["history"][2]["bpb"]["manpages"] == c3_eval["bpb_before"]["manpages"]
    assert c3_eval["history"][:2] == c2["history"][:2]
    # Narrow deps: a change to tracking code leaves everything but the tracking stages up to date.
    tracking = (proj / "hst/tracking.py").read_text()
    (proj / "hst/tracking.py").write_text(tracking + "\n# edited\n")
    status = subprocess.run([*dvc, "status", "--json"], cwd=proj, capture_output=True, text=True, env=env)
    assert set(json.loads(status.stdout)) == {"track@c1", "track@c2", "track@c3"}, status.stdout
    (proj / "hst/tracking.py").write_text(tracking)
    torch.load(proj / "models/pretrain.pt", weights_only=True)
    # Bad params under `dvc repro`: the stage fails in one line and the outputs survive (persist).
    before = (proj / "models/pretrain.pt").read_bytes()
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["pretrain"]["lr"] = "fast"
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    bad = subprocess.run([*dvc, "repro"], cwd=proj, capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "params.yaml:pretrain.lr: expected finite float" in bad.stdout + bad.stderr
    assert (proj / "models/pretrain.pt").read_bytes() == before
    assert (proj / "data/prepared/python/train.parquet").is_file()


def assert_store_holds_cycles(proj: Path, cycles: list[str]) -> None:
    """The project's MLflow store has a FINISHED child run per cycle under a FINISHED parent, and
    ``champion`` on the last cycle that passed its gate."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{proj}/mlflow.db"
    client = MlflowClient(uri, uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    children = {r.data.tags["hst.cycle"]: r for r in runs if r.data.tags["hst.role"] == "cycle"}
    assert sorted(children) == cycles and {r.info.status for r in runs} == {"FINISHED"}
    passed = [c for c in cycles if json.loads((proj / f"metrics/gate/{c}.json").read_text())["passed"]]
    champion = client.get_model_version_by_alias("tiny", "champion")
    assert champion.tags["cycle"] == (passed[-1] if passed else "pretrain")


def gate(cwd, params, *args):
    return stage(cwd, "gate", "--params", str(params), "--cycle", "c1", "--candidate", "c1.pt", "--eval", "eval.json",
                 "--previous", "pretrain.champion.pt", "--previous-report", "pretrain.gate.json",
                 "--out", "c1.champion.pt", "--report", "c1.gate.json", *args)


def gate_inputs(tmp_path, forgetting, stability) -> dict[str, bytes]:
    """Two real tiny checkpoints and the reports the gate reads; returns the checkpoints' bytes."""
    cfg = ModelConfig(**TINY_MODEL)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"model": TINY_MODEL, "gate": {
        "max_forgetting": 0.05, "min_routing_stability": 0.9}}))
    for seed, name in [(1, "c1.pt"), (2, "pretrain.champion.pt")]:
        torch.manual_seed(seed)
        checkpoint.save(tmp_path / name, GPT(cfg), {})
    (tmp_path / "pretrain.gate.json").write_text(json.dumps({"champion": "pretrain"}))
    (tmp_path / "eval.json").write_text(json.dumps({"forgetting": {"python": forgetting}, "routing_stability_mean": stability}))
    return {n: (tmp_path / n).read_bytes() for n in ("c1.pt", "pretrain.champion.pt")}


@pytest.mark.parametrize("forgetting, stability, passed", [(0.04, 0.95, True), (0.06, 0.95, False), (0.0, 0.85, False),
                                                           (float("nan"), 0.95, False)])
def test_gate_promotes_only_a_passing_cycle(tmp_path, forgetting, stability, passed):
    files = gate_inputs(tmp_path, forgetting, stability)
    proc = gate(tmp_path, tmp_path / "params.yaml")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "c1.gate.json").read_text())
    assert report["passed"] is passed and report["champion"] == ("c1" if passed else "pretrain")
    assert (tmp_path / "c1.champion.pt").read_bytes() == files["c1.pt" if passed else "pretrain.champion.pt"]
    assert bool(report["reasons"]) is not passed
    if forgetting != forgetting:  # NaN: a failure and an alarm, never a champion
        assert report["reasons"] == report["alarms"] == ["forgetting on python is nan"]


def test_gate_never_promotes_a_model_with_non_finite_weights(tmp_path):
    gate_inputs(tmp_path, 0.0, 0.95)
    state = torch.load(tmp_path / "c1.pt", weights_only=True)
    state["state_dict"]["lm_head.weight"][0, 0] = float("nan")  # as in the issue: NaN only in lm_head
    torch.save(state, tmp_path / "c1.pt")
    assert "c1.pt: non-finite weights (lm_head.weight)" in error_line(gate(tmp_path, tmp_path / "params.yaml"))
    assert not (tmp_path / "c1.champion.pt").exists() and not (tmp_path / "c1.gate.json").exists()


def test_gate_rejects_bad_params_in_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text("gate: {max_forgetting: -1}\n")
    assert "params.yaml:gate.max_forgetting: expected >= 0" in error_line(gate(tmp_path, tmp_path / "params.yaml"))
    assert not (tmp_path / "c1.champion.pt").exists()


def cycle_stages(proj: Path, params: Path, cycle: str = "c1", start: str = "models/pretrain.pt") -> dict[str, subprocess.CompletedProcess]:
    """build_index → collect → learn of ``cycle`` from checkpoint ``start``, into ``<cycle>/``."""
    p = ("--params", str(params))
    c = cycle
    runs = {}
    for name, args in [
        ("build_index", ("--checkpoint", start, "--prepared", "data/prepared", "--out", f"{c}/index.parquet")),
        ("collect", ("--cycle", c, "--checkpoint", start, "--prepared", "data/prepared", "--out", f"{c}/buffer")),
        ("learn", learn_args(c, start, f"{c}/buffer", f"{c}/index.parquet", c)),
    ]:
        runs[name] = stage(proj, name, *p, *args)
        if runs[name].returncode:
            break
    return runs


def test_a_repeat_drop_grows_no_path_and_consolidates_only_the_path_that_explains_it(pretrained, tmp_path):
    proj = tmp_path / "proj"
    shutil.copytree(pretrained, proj)
    text = gzip.decompress((ROOT / "data/corpus/german.txt.gz").read_bytes())[:500_000]
    (proj / "data/corpus/german.txt").write_bytes(text[:text.rfind(b"\n\n")])
    assert stage(proj, "prepare", "--domain", "german", "--out", "data/prepared/german",
                 "--manifest", "metrics/prepare/german.json").returncode == 0
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["cycles"] = {"c1": {"domain": "german", "prev": "pretrain"}, "c2": {"domain": "german", "prev": "c1"}}
    params["cycle"] |= {"mode": "grow", "incoming_records": 300}
    params["grow"] |= {"experts": 1, "min_records": 16}  # select: posterior and decide: novelty, the defaults
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    runs = cycle_stages(proj, tmp_path / "params.yaml", "c1")
    assert all(r.returncode == 0 for r in runs.values()), {k: r.stderr[-500:] for k, r in runs.items()}
    first = json.loads((proj / "c1/grow.json").read_text())
    assert first["decision"]["grown_path"] == 1 and first["decision"]["grow_records"] == 300 and first["paths"] == 2
    runs = cycle_stages(proj, tmp_path / "params.yaml", "c2", "c1/final.pt")
    assert all(r.returncode == 0 for r in runs.values()), {k: r.stderr[-500:] for k, r in runs.items()}
    second = json.loads((proj / "c2/grow.json").read_text())["decision"]
    assert second["grown_path"] is None and second["consolidated"]["1"]["new_records"] >= 280
    assert second["consolidated"]["1"]["old_records"] > 0 and second["path_domains"] == [["shakespeare", "python"], ["german"]]
    (before, _), (after, meta) = checkpoint.load(proj / "c1/final.pt"), checkpoint.load(proj / "c2/final.pt")
    assert after.n_paths == 2 and after.n_experts == before.n_experts and meta["learned_domains"].count("german") == 1
    changed = {k for k, v in before.state_dict().items() if not torch.equal(v, after.state_dict()[k])}
    # The path's experts and keys moved; its own head stays as growth left it (hst.grow.consolidate_path).
    assert "blocks.0.ffn.experts.4.up.weight" in changed and changed <= {"path_sketches"} | {
        f"blocks.{layer}.ffn.{part}" for layer in range(2) for part in ("router.keys", "experts.4.up.weight",
                                                                        "experts.4.down.weight")}
    # Only path 1's sketch took the drop's counts; path 0's (one per pretraining domain) are as they were.
    old_sketches, new_sketches = sketches.unstack(before.path_sketches), sketches.unstack(after.path_sketches)
    assert len(new_sketches) == 3 and all(torch.equal(a, b) for a, b in zip(old_sketches[:2], new_sketches[:2]))
    assert sketches.sketch_bytes(after.path_sketches)[2] > sketches.sketch_bytes(before.path_sketches)[2]


@pytest.mark.parametrize("replay, select", [("stored", "gate"), ("generated", "gate"), ("generated", "posterior")])
def test_a_replay_free_cycle_reads_no_old_text_and_grows_beside_bit_identical_experts(pretrained, tmp_path, replay, select):
    proj = tmp_path / "proj"
    shutil.copytree(pretrained, proj)
    # The learned domains' records are gone: a cycle that reads old text cannot run.
    for domain in ("shakespeare", "python"):
        shutil.rmtree(proj / "data/prepared" / domain)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    # Growth in mode grow needs no novelty: the quantile is set so that no record is novel.
    params["cycle"] |= {"mode": "grow", "replay": replay}
    params["grow"] |= {"quantile": 0.999, "min_batches": 50, "experts": 2, "select": select,
                       "old_share": 0.25 if select == "gate" else 0.0}  # old records: generated ones
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    runs = cycle_stages(proj, tmp_path / "params.yaml")
    if replay == "stored":
        assert "data/prepared/shakespeare/train.parquet: missing" in error_line(runs["build_index"])
        return
    assert all(r.returncode == 0 for r in runs.values()), {k: r.stderr[-500:] for k, r in runs.items()}
    index = sampler.read_buffer(proj / "c1/index.parquet")
    assert set(index["source"].to_pylist()) == {"generated"} and index.num_rows == 6
    assert json.loads((proj / "c1/consolidate.json").read_text())["sets"] == []  # mode grow trains no shared expert
    report = json.loads((proj / "c1/grow.json").read_text())
    assert report["triggered"] and report["batch_shares"] and max(report["batch_shares"]) < 1
    assert (report["old_records"] > 0) == (select == "gate")
    start, _ = checkpoint.load(proj / "models/pretrain.pt")
    final, _ = checkpoint.load(proj / "c1/final.pt")
    assert final.n_experts == [6, 6]
    # Everything that existed before the cycle is bit-identical; only the new experts differ.
    after = final.state_dict()
    for name, tensor in start.state_dict().items():
        if name.endswith(("keys", "expert_gate", "expert_path")) or name.split(".")[-1].startswith("gate_"):
            tensor, new = tensor, after[name][:len(tensor)]
        else:
            new = after[name]
        assert tensor.numel() == 0 or torch.equal(tensor, new), name  # numel 0: no gate before the cycle
    assert final.n_paths == (2 if select == "posterior" else 1)
    if select == "posterior":  # on path 0 (no grown path's experts) the grown model is the start model
        idx = data.encode(["Und es begab sich zu der Zeit, dass ein Gebot von dem Kaiser ausging."])[None, :60].long()
        assert torch.equal(final(idx, path=0).logits, start(idx).logits)


def test_a_full_disk_in_a_stage_is_one_line(capsys):
    import errno

    from stages.common import run

    def main():
        raise OSError(errno.ENOSPC, "No space left on device", "models/pretrain.pt")

    with pytest.raises(SystemExit) as e:
        run(main)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0
    assert err.startswith("error: models/pretrain.pt: no space left on its disk")
