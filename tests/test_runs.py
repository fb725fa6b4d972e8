import hashlib
import re
from pathlib import Path

import pytest

from hst import runs
from hst.config import ConfigError
from hst.params import check_params, read_params

ROOT = Path(__file__).resolve().parents[1]


def test_variants_with_the_same_pretraining_start_from_the_first_ones_experiment(monkeypatch):
    calls = []
    monkeypatch.setattr(runs, "git", lambda *args: calls.append(("git", *args)) or "")
    monkeypatch.setattr(runs.subprocess, "run", lambda cmd, check: calls.append(tuple(cmd)))
    runs.run_experiments([("dense-ft", ["model.ffn=dense", "cycle.mode=full"]),
                          ("hst-2x", ["grow.steps=320"]),
                          ("dense-rp", ["cycle.mode=full_replay", "model.ffn=dense"])])
    exps = [c for c in calls if c[:3] == ("dvc", "exp", "run")]
    assert [c[4] for c in exps] == ["dense-ft", "hst-2x", "dense-rp"]
    applied = [c for c in calls if c[:3] == ("dvc", "exp", "apply")]
    assert applied == [("dvc", "exp", "apply", "dense-ft")]  # only the second dense variant reuses
    i = calls.index(applied[0])
    # ... after the workspace went back to HEAD, then with the default params restored before its run.
    assert calls[i - 1] == ("dvc", "checkout", "-q") and calls[i + 1] == ("git", "checkout", "--", "params.yaml")
    assert calls[i + 2] == exps[2] and calls[-1] == ("dvc", "checkout", "-q")  # HEAD again at the end


def test_a_bad_variant_fails_before_any_experiment_runs(monkeypatch):
    calls = []
    monkeypatch.setattr(runs, "git", lambda *args: calls.append(("git", *args)) or "")
    monkeypatch.setattr(runs.subprocess, "run", lambda cmd, check: calls.append(tuple(cmd)))
    with pytest.raises(ConfigError, match="with learned-hst's overrides:cycle.mode: 'grow' needs model.ffn key"):
        runs.run_experiments([("dense-ft", ["model.ffn=dense", "cycle.mode=full"]), ("learned-hst", ["model.ffn=learned"])])
    assert calls == []


def test_overrides_set_keys_as_dvc_exp_run_does():
    params = {"model": {"ffn": "key", "n_layer": 4}, "grow": {"gate_fpr": 0.01}}
    out = runs.with_overrides(params, ["model.ffn=dense", "grow.gate_fpr=0.03", "model.top_k=2"])
    assert out == {"model": {"ffn": "dense", "n_layer": 4, "top_k": 2}, "grow": {"gate_fpr": 0.03}}
    assert params["model"]["ffn"] == "key"  # the input is left alone
    for bad in ["model.ffn", "nosection.x=1", "model.ffn.deeper=1", "model.=1"]:
        with pytest.raises(runs.RunError, match=re.escape(f"override {bad!r}: expected SECTION.KEY=VALUE")):
            runs.with_overrides(params, [bad])


def test_every_variant_the_studies_run_passes_the_params_check():
    """`compare_table --run` and `pareto --run` would otherwise fail after hours, at the stage that
    first reads the offending key."""
    from scripts import compare_table, pareto

    params = read_params(ROOT / "params.yaml")
    variants = [(name, o + runs.OPEN_GATE) for name, o in compare_table.BASELINES.values()]
    variants += [(name, o) for _, _, name, o in pareto.points()]
    for name, overrides in variants:
        check_params(runs.with_overrides(params, overrides), name)


def test_forward_speed_comes_from_the_bench_only_for_networks_it_ran(tmp_path):
    def run(name: str, ffn: str, last_eval: str) -> str:
        folder = tmp_path / name
        (folder / "eval").mkdir(parents=True)
        (folder / "params.yaml").write_text((ROOT / "params.yaml").read_text().replace("ffn: key", f"ffn: {ffn}"))
        (folder / "eval" / "c4_gcide.json").write_text(last_eval)
        return str(folder)

    champion = '{"inference": {"mode": "select_base"}}\n'
    bench = {"vs_dense": {"dense": 1.0, "standard MoE": 0.8, "champion select_base": 0.3, "champion select": 0.6},
             "champion_eval_md5": hashlib.md5(champion.encode()).hexdigest()}
    assert runs.forward_speed(run("dense", "dense", "{}"), "c4_gcide", bench) == 1.0
    assert runs.forward_speed(run("moe", "learned", "{}"), "c4_gcide", bench) == 0.8
    # A model with paths: only the run whose last evaluation the bench's champion had, by its inference mode.
    assert runs.forward_speed(run("hst", "key", champion), "c4_gcide", bench) == 0.3
    assert runs.forward_speed(run("other", "key", champion.replace("}}", "}, \"x\": 1}")), "c4_gcide", bench) is None
    assert runs.speed(None) == "–" and runs.speed(0.337) == "0.34×"
