"""Determinism: two from-scratch `dvc repro` runs of the same project write byte-identical outputs."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_stages import dvc_env, tiny_project

# Every stage but `track`, whose output is a receipt of MLflow's run ids (uuids the store assigns):
# the last champion's index needs every other stage, not `track`.
LAST_STAGE = "build_index@c2"


def out_hashes(proj: Path) -> dict[str, str]:
    """``stage: path`` -> md5 of every output recorded in the project's dvc.lock."""
    stages = yaml.safe_load((proj / "dvc.lock").read_text())["stages"]
    return {f"{name}: {out['path']}": out["md5"] for name, st in stages.items() for out in st.get("outs", [])}


def cheap_project(tmp: Path) -> Path:
    """The tiny two-cycle project with fewer records and steps: most of a run is per-stage start-up."""
    proj = tiny_project(tmp)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["pretrain"].update(steps=8, eval_every=4)
    params["cycle"].update(index_records=10, incoming_records=16)
    params["consolidate"].update(steps=6)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return proj


@pytest.mark.slow
def test_two_runs_from_scratch_record_the_same_output_hashes(tmp_path):
    projects = [cheap_project(tmp_path / run) for run in ("a", "b")]
    dvc = [sys.executable, "-m", "dvc"]
    for proj in projects:
        subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=proj, check=True, env=dvc_env(proj))
    # Side by side, one thread each: on two cores the test takes the time of one run.
    runs = [subprocess.Popen([*dvc, "repro", LAST_STAGE], cwd=proj, env=dvc_env(proj), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for proj in projects]
    for proc in runs:
        output = proc.communicate()[0]
        assert proc.returncode == 0, output
    a, b = (out_hashes(proj) for proj in projects)
    assert {"pretrain: models/pretrain.pt", "gate@c2: models/c2.champion.pt", "build_index@c2: indexes/c2.parquet"} <= set(a)
    assert set(a) == set(b) and not any(name.startswith("track@") for name in a)
    differ = [out for out in a if a[out] != b[out]]
    assert not differ, f"outputs that differ between two runs of the same project: {differ}"
