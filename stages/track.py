"""DVC stage `track`: log a finished cycle to MLflow and mirror its gate in the model registry.

A child run per cycle (metrics at ``step`` = the cycle's position in ``params.yaml:cycles``; the
evaluation PNGs and JSONs and the checkpoint as artifacts; tags: variant, git commit, the DVC hashes
of the cycle's outputs, gate decision, alarms) under one parent run per variant and settings
(``hst.tracking``), in the scenario's one experiment. The variant is the DVC experiment's name
under `dvc exp run` (``$DVC_EXP_NAME``; `-n NAME` sets it), else ``<model.ffn>-<cycle.mode>``. The
store is ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``; a relative SQLite path lies in the
original project even when DVC runs the stage in a temporary copy (``hst.tracking.store_uri``).
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import subprocess
import sys
from pathlib import Path

import yaml

from hst import registry, serving, tracking
from hst.config import CycleConfig, ModelConfig, ServeConfig, TrackingConfig
from hst.io import read_json, write_json
from hst.params import load_section, read_params
from stages.common import run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--cycle", required=True)
    ap.add_argument("--eval", required=True, help="the cycle's evaluation JSON")
    ap.add_argument("--gate", required=True, help="the cycle's gate report")
    ap.add_argument("--checkpoint", required=True, help="the cycle's final checkpoint (registered)")
    ap.add_argument("--champion", required=True, help="the champion after the gate")
    ap.add_argument("--plots", required=True, help="the cycle's plot directory (PNGs, curve CSVs)")
    ap.add_argument("--metrics-dir", required=True, help="the cycle's stage metrics (consolidate.json, grow.json)")
    ap.add_argument("--pretrain-plots", required=True, help="pretraining curves (train.csv, val.csv)")
    ap.add_argument("--lock", default="dvc.lock", help="DVC lock file: hashes of the cycle's outputs")
    ap.add_argument("--out", required=True, help="JSON: experiment, run ids, registered versions")
    args = ap.parse_args()

    cycles, serve_cfg = load_section(args.params, "cycles"), load_section(args.params, "serve", ServeConfig)
    variant = os.environ.get("DVC_EXP_NAME") or (f"{load_section(args.params, 'model', ModelConfig).ffn}-"
                                                 f"{load_section(args.params, 'cycle', CycleConfig).mode}")
    names = load_section(args.params, "tracking", TrackingConfig).resolve(variant)
    uri = tracking.store_uri(os.environ, Path.cwd())
    os.environ.update(tracking.client_limits(os.environ))
    params = tracking.sequence_params(read_params(args.params))
    report, gate = read_json(args.eval), read_json(args.gate, ("alarms",))
    plots, mdir = Path(args.plots), Path(args.metrics_dir)
    result = tracking.log_cycle(
        uri, names.experiment, variant, tracking.sequence_key(params, variant), params,
        {f"pretrain.{n}": _csv(Path(args.pretrain_plots) / f"{n}.csv") for n in ("train", "val")},
        args.cycle, list(cycles).index(args.cycle) + 1, report, gate,
        {n: _csv(plots / f"{n}.csv") for n in ("consolidate", "grow")},
        [p for p in [*sorted(plots.glob("*.png")), Path(args.eval), Path(args.gate), *sorted(mdir.glob("*.json"))]
         if p.is_file() and p.name != Path(args.out).name],
        {"mlflow.source.git.commit": _git_commit(), **_dvc_hashes(Path(args.lock), args.cycle)})
    package = functools.partial(serving.save_model, cfg=serve_cfg, registered_model=names.registered_model,
                                tracking_uri=uri)
    result |= registry.register_cycle(uri, names.registered_model, result["run_id"], args.cycle,
                                      Path(args.checkpoint), Path(args.champion), gate, package)
    for alarm in gate["alarms"]:
        print(f"warning: cycle {args.cycle}: {alarm}", file=sys.stderr)
    write_json(args.out, {**result, "cycle": args.cycle, "gate": gate})


def _csv(path: Path) -> list[dict]:
    """Curve rows with numbers parsed (empty when the stage wrote no curve)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _number(v: str):
    try:
        return float(v)
    except ValueError:
        return v


def _git_commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "none"


def _dvc_hashes(lock: Path, cycle: str) -> dict[str, str]:
    """``dvc.<out path>`` -> md5 for every output of the cycle's stages already in the lock file."""
    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {f"dvc.{out['path']}": out["md5"] for name, st in stages.items() if name.endswith(f"@{cycle}")
            for out in st.get("outs", []) if "md5" in out}


if __name__ == "__main__":
    run(main)
