"""hst.distributed: pretraining under `torchrun` (two gloo processes on the CPU) follows the
single-process run, and only rank 0 writes."""

import csv
import subprocess
import sys

import pytest
import torch
import yaml

from hst import checkpoint
from project import dvc_env, prepare, stage, tiny_project

def pretrain_args(out: str) -> list[str]:
    return ["--prepared", "data/prepared", "--checkpoint", f"{out}/pretrain.pt", "--metrics", f"{out}/pretrain.json",
            "--routing", f"{out}/routing.json", "--plots", f"{out}/plots", "--eval", f"{out}/eval.json"]


def torchrun_pretrain(proj, out: str) -> subprocess.CompletedProcess:
    """The pretrain stage under `torchrun` with two processes (gloo on the CPU), outputs under ``out``."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "stages.pretrain", *pretrain_args(out)],
                          cwd=proj, capture_output=True, text=True, env=dvc_env(proj), timeout=300)


def curve(path) -> list[dict[str, float]]:
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


@pytest.mark.slow
def test_two_torchrun_processes_follow_the_single_process_curve(tmp_path):
    proj = tiny_project(tmp_path)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    # Eight experts for 2 x 64 tokens per rank: some get no token on a rank in some steps.
    params["model"]["n_experts"] = 8
    params["pretrain"] |= {"steps": 10, "batch_size": 4, "eval_every": 5}
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    assert prepare(proj).returncode == 0
    one = stage(proj, "pretrain", *pretrain_args("one"))
    assert one.returncode == 0, one.stderr
    two = torchrun_pretrain(proj, "two")
    assert two.returncode == 0, two.stderr[-3000:]

    for name in ("train.csv", "val.csv"):
        a, b = curve(proj / "one/plots" / name), curve(proj / "two/plots" / name)
        assert len(a) == len(b) == (10 if name == "train.csv" else 2)
        for ra, rb in zip(a, b):
            assert ra.keys() == rb.keys()
            for k in ra:
                assert rb[k] == pytest.approx(ra[k], abs=1e-4), (name, ra["step"], k)
    (m1, _), (m2, _) = checkpoint.load(proj / "one/pretrain.pt"), checkpoint.load(proj / "two/pretrain.pt")
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:  # weights and the routers' keys
        assert torch.allclose(s1[k], s2[k], atol=1e-4), k
    # rank 0 alone wrote, once: no second copy, no temp leftovers
    assert sorted(p.name for p in (proj / "two").iterdir()) == sorted(p.name for p in (proj / "one").iterdir())
    assert not [p for p in (proj / "two").rglob(".*")]


def test_an_uneven_batch_split_is_one_line(tmp_path):
    """A batch that does not split over the processes fails before training, naming the key."""
    proj = tiny_project(tmp_path)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["pretrain"]["batch_size"] = 3
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    assert prepare(proj).returncode == 0
    two = torchrun_pretrain(proj, "two")
    assert two.returncode != 0
    assert "error: batch_size: 3 sequences do not split evenly over 2 processes" in two.stderr
    assert not (proj / "two").exists()
