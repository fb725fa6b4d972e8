"""The tiny project the end-to-end tests run: a copy of the code, a slice of four real domains, tiny
params; the helpers that run its stages and DVC; and records of the shipped domains."""

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from hst import data

ROOT = Path(__file__).resolve().parents[1]

DOMAINS = ("shakespeare", "python", "kjv", "german")
TINY_MODEL = dict(seq_len=64, n_layer=2, n_head=2, d_model=32, ffn="key", n_experts=4, top_k=2,
                  expert_hidden=32)


def tiny_project(tmp: Path) -> Path:
    """A copy of the project with a small slice of two real domains and tiny params."""
    for name in ("hst", "stages", "flows"):
        shutil.copytree(ROOT / name, tmp / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", tmp / "dvc.yaml")
    (tmp / "data/corpus").mkdir(parents=True)
    for name in DOMAINS:
        text = gzip.decompress((ROOT / f"data/corpus/{name}.txt.gz").read_bytes())[:60_000]
        (tmp / f"data/corpus/{name}.txt").write_bytes(text[:text.rfind(b"\n\n")])
    params = {
        "prepare": {"domains": {d: f"data/corpus/{d}.txt" for d in DOMAINS},
                    "val_fraction": 0.1, "test_fraction": 0.1, "min_record_bytes": 256,
                    "max_record_bytes": 2048, "seed": 0},
        "model": TINY_MODEL,
        "pretrain": {"domains": ["shakespeare", "python"], "steps": 12, "batch_size": 4, "warmup_steps": 2,
                     "eval_every": 6, "eval_windows": 4, "precision": "fp32"},
        "cycles": {"c1": {"domain": "kjv", "prev": "pretrain"}, "c2": {"domain": "german", "prev": "c1"}},
        "cycle": {"mode": "experts", "replay": "stored", "replay_records": 6, "incoming_records": 40, "index_records": 30, "min_new_data": 3,
                  "new_old_ratio": 0.2, "eval_windows": 4, "seed": 0},
        "consolidate": {"steps": 12, "batch_size": 4, "lr": 0.001, "warmup_steps": 1, "eval_every": 100,
                        "eval_windows": 2, "precision": "fp32"},
        # Any batch with a record above the lowest held-in BPB triggers: growth is forced.
        "grow": {"enabled": True, "quantile": 1e-6, "batch_records": 8, "min_batches": 1, "novel_share": 0.0,
                 "gate_windows": 4, "experts": 1, "init": "copy_nearest", "steps": 4},
        # A tiny model forgets far more than 5 % in a cycle; the flow tests set their own gate.
        "gate": {"max_forgetting": 10.0, "min_routing_stability": 0.0},
        "tracking": {"experiment": "tiny", "registered_model": "tiny"},
        "flow": {"retries": 0, "retry_delay_seconds": 0},
        "serve": {},  # the defaults; `track` reads the section, so DVC needs it present
    }
    (tmp / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return tmp


def dvc_env(proj: Path) -> dict:
    """Environment for `dvc` in a tiny project: the stages' `python` is this interpreter, one thread each."""
    return {**os.environ, "PYTHONPATH": str(proj), "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def stage(cwd: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"stages.{name}", *args], cwd=cwd,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(cwd)})


def prepare(cwd) -> subprocess.CompletedProcess:
    """Every domain of the project's params prepared into data/prepared (one stage run per domain, as
    dvc.yaml does); the first failing run, else the last."""
    for domain in yaml.safe_load((cwd / "params.yaml").read_text())["prepare"]["domains"]:
        proc = stage(cwd, "prepare", "--domain", domain, "--out", f"data/prepared/{domain}",
                     "--manifest", f"metrics/prepare/{domain}.json")
        if proc.returncode != 0:
            break
    return proc


def error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def corpus_records(domain: str, n: int, skip: int = 0) -> list[torch.Tensor]:
    """``n`` records of a shipped domain (after the first ``skip``), each as its byte tokens."""
    text = gzip.decompress((ROOT / f"data/corpus/{domain}.txt.gz").read_bytes())[:400_000].decode(errors="ignore")
    return [data.encode([r]) for r in data.cut_records(text, 256, 2048)[skip:skip + n]]
