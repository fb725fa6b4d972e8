"""Reading the outputs of finished runs: the workspace, DVC experiments and exported run folders.

The studies under ``scripts/`` compare variants of the scenario. A variant's files are read from the
workspace (``workspace``), from a DVC experiment (``exp:NAME``: its git ref under ``refs/exps``,
where ``dvc exp run -n NAME`` stores params and metrics) or from a folder :func:`export` filled
from one (committed, so tables rebuild in a fresh clone without the experiments' refs);
:func:`track` logs such a finished run into the MLflow store as one variant of the scenario.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import subprocess
from pathlib import Path

import torch
import yaml

from hst import tracking
from hst.config import GrowConfig, HSTError, ModelConfig, TrackingConfig
from hst.model import GPT
from hst.params import build, check_params, parse_params, read_params
from hst.router import Gate

# Baselines run with the promotion gate open (and growth off), so a cycle that forgets still becomes
# the next cycle's start: plain sequential finetuning.
OPEN_GATE = ["grow.enabled=false", "gate.max_forgetting=1000", "gate.min_routing_stability=0"]
# Methods that train on old index records (coresets, replay) need a pool of ~4x a cycle's 200 new
# records: 600 per learned domain, where HST's default index (the novelty threshold) has 50 (150 with learned gates).
REPLAY_POOL = ["cycle.index_records=600"]
# The bench run the results tables read forward speed from (:func:`forward_speed`), and what they say of it.
BENCH = "docs/bench/paths.json"
SPEED_NOTE = ("Forward tokens/s ÷ dense: one bench run (`python bench/bench_paths.py --champion "
              "models/c4_gcide.champion.pt`, `docs/bench/paths.json`; 18 validation windows of 256 bytes, 2 threads): "
              "dense and standard-MoE rows are the bench's networks of their shape, whose cost does not depend on "
              "their weights; an HST row has a number only for the run the bench's champion comes from (the "
              "others' models are not kept).")


class RunError(HSTError):
    """A variant, experiment or file of a run is missing."""


def git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout


def exp_ref(name: str) -> str:
    """The git ref of the newest DVC experiment called ``name``."""
    refs = [r for r in git("for-each-ref", "--sort=committerdate", "--format=%(refname)", "refs/exps").split()
            if r.rsplit("/", 1)[-1] == name]
    if not refs:
        raise RunError(f"no DVC experiment named {name!r} (run `dvc exp list`)")
    return refs[-1]


def read_text(source: str, path: str) -> str:
    """A file of a variant (``metrics/x`` is ``DIR/x`` in an exported folder, any other path ``DIR/path``)."""
    if source == "workspace":
        return Path(path).read_text()
    if not source.startswith("exp:"):
        file = Path(source) / path.removeprefix("metrics/")
        if not file.is_file():
            raise RunError(f"{file}: not found (variant directory {source!r}, written by export)")
        return file.read_text()
    name = source.removeprefix("exp:")
    out = subprocess.run(["git", "show", f"{exp_ref(name)}:{path}"], capture_output=True, text=True)
    if out.returncode:
        raise RunError(f"experiment {name!r} has no {path}")
    return out.stdout


def read_metrics(source: str, path: str) -> dict:
    return json.loads(read_text(source, path))


def variant_params(source: str) -> dict:
    """A variant's ``params.yaml``, as it ran."""
    return parse_params(read_text(source, "params.yaml"), f"{source}:params.yaml")


def export(name: str, dest: Path) -> None:
    """Copy ``params.yaml`` and every file under ``metrics/`` of DVC experiment ``name`` into ``dest``
    (``metrics/`` stripped), so that a run's numbers can be committed next to its table."""
    ref = exp_ref(name)
    for path in ["params.yaml", *git("ls-tree", "-r", "--full-tree", "--name-only", ref, "metrics").split()]:
        target = dest / path.removeprefix("metrics/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(git("show", f"{ref}:{path}"))


def track(source: str, variant: str, uri: str) -> list[str]:
    """Log the cycles of finished run ``source`` into the MLflow store at ``uri`` as ``variant``, with
    the `track` stage's functions: same experiment, parent run (metrics at ``step`` = cycle) and child
    runs as if it had run under that name. Its params and metrics are all a run keeps (exports hold no
    checkpoints or curves), so nothing is registered. Cycles the sequence already has are skipped, so
    loading twice adds nothing; returns the cycles logged."""
    params = variant_params(source)
    names = build(TrackingConfig, params.get("tracking"), f"{source}: params.yaml:tracking").resolve(variant)
    key, sequence = tracking.sequence_key(params, variant), tracking.sequence_params(params)
    done, logged = tracking.tracked_cycles(uri, names.experiment, key), []
    for index, cycle in enumerate(params["cycles"], 1):
        if cycle not in done:
            tracking.log_cycle(uri, names.experiment, variant, key, sequence, {}, cycle, index,
                               read_metrics(source, f"metrics/eval/{cycle}.json"),
                               read_metrics(source, f"metrics/gate/{cycle}.json"), {}, [], {"hst.source": source})
            logged.append(cycle)
    return logged


def model_of(source: str, experts_per_layer: list[int]) -> GPT:
    """An (untrained) model of a variant's shape, grown experts' paths or gates included (one per grown
    cycle and layer, ``grow.experts`` experts each): for its FLOPs and parameter count."""
    params = variant_params(source)
    # Older experiments may carry model keys that have since been removed (e.g. novelty_threshold).
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    model = GPT(ModelConfig(**{k: v for k, v in params["model"].items() if k in known}), experts_per_layer)
    if model.cfg.ffn == "key":
        grow = {**dataclasses.asdict(GrowConfig(gate_hidden=0, select="gate")), **params.get("grow", {})}  # older runs: linear gates
        d, h = model.cfg.d_model, grow["gate_hidden"]
        for layer, n in enumerate(experts_per_layer):
            router = model.moe(layer).router
            for growth in range((n - model.cfg.n_experts) // grow["experts"]):
                if grow["select"] == "posterior":  # growth g's experts are path g + 1
                    start = model.cfg.n_experts + growth * grow["experts"]
                    router.expert_path[start:start + grow["experts"]] = growth + 1
                else:
                    router.add_gate(Gate(torch.zeros(d), torch.zeros(h, d), torch.zeros(h), torch.zeros(h),
                                         torch.tensor(0.0), torch.tensor(0.0)))
    return model


def inference_cost(source: str, report: dict) -> dict:
    """What a variant's model after a cycle spends per token at inference (``report``: that cycle's
    evaluation): as ``evaluate`` measured it, or, for runs exported before it did, the model of its
    shape (:func:`model_of`: every path of a posterior mixture runs, learned gates included)."""
    if "inference" in report:
        return report["inference"]
    model = model_of(source, report["experts_per_layer"])
    return {"paths": model.n_paths, "mflops_per_token": model.flops_per_token(all_paths=True) / 1e6,
            "parameters": sum(p.numel() for p in model.parameters())}


def forward_speed(source: str, last_cycle: str, bench: dict) -> float | None:
    """A variant's last model's forward tokens/s ÷ the dense model's, from one bench run (``bench``: the JSON
    of ``bench/bench_paths.py --champion``, :data:`BENCH`). A dense model is the reference itself and a
    standard MoE's cost does not depend on its weights (a fixed top-k), so the bench's networks of their
    shape stand for them; a model with paths spends what its selection decides, so only the run whose
    last evaluation the bench's champion had gets a number. None: not measured."""
    speeds = bench.get("vs_dense", {})
    ffn = variant_params(source)["model"]["ffn"]
    if ffn != "key":
        return speeds.get("dense" if ffn == "dense" else "standard MoE")
    text = read_text(source, f"metrics/eval/{last_cycle}.json")
    if hashlib.md5(text.encode()).hexdigest() != bench.get("champion_eval_md5"):
        return None
    return speeds.get(f"champion {json.loads(text).get('inference', {}).get('mode')}")


def speed(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:+.2f} %"


# Override prefixes that change what the stages before the first cycle produce.
PRETRAINING = ("prepare.", "model.", "pretrain.")


def with_overrides(params: dict, overrides: list[str]) -> dict:
    """A copy of ``params`` with each ``section.key=value`` set as ``dvc exp run -S`` sets it (value as YAML)."""
    out = copy.deepcopy(params)
    for override in overrides:
        path, sep, value = override.partition("=")
        *parents, leaf = path.split(".")
        node = out
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if not sep or not leaf or not isinstance(node, dict):
            raise RunError(f"override {override!r}: expected SECTION.KEY=VALUE naming a key of params.yaml")
        node[leaf] = yaml.safe_load(value)
    return out


def run_experiments(variants: list[tuple[str, list[str]]]) -> None:
    """Run each ``(name, overrides)`` as a DVC experiment in the workspace (``dvc exp run -n NAME -S …``),
    pretraining once per distinct pretraining.

    A variant whose ``prepare``/``model``/``pretrain`` overrides equal an earlier variant's starts from
    that experiment's outputs (``dvc exp apply``, then the default params.yaml back), so DVC finds
    pretraining up to date and runs only the cycles. (The run-cache would do this, but DVC leaves
    ``persist`` outputs out of it, and persist is what keeps a failed stage's old outputs.) The
    workspace is back at HEAD before each variant and afterwards: commit your own changes first.
    Every variant's params are checked before the first one runs, so a bad variant fails in seconds,
    not after another variant's pretraining.
    """
    params = read_params("params.yaml")
    for name, overrides in variants:
        check_params(with_overrides(params, overrides), f"params.yaml with {name}'s overrides")
    first: dict[tuple[str, ...], str] = {}
    try:
        for name, overrides in variants:
            key = tuple(sorted(o for o in overrides if o.startswith(PRETRAINING)))
            restore_head()
            if key in first:
                subprocess.run(["dvc", "exp", "apply", first[key]], check=True)
                git("checkout", "--", "params.yaml")
            subprocess.run(["dvc", "exp", "run", "-n", name, *(a for o in overrides for a in ("-S", o))], check=True)
            first.setdefault(key, name)
    finally:
        restore_head()


def restore_head() -> None:
    """Params, lock, metrics, plots and DVC outputs as committed at HEAD."""
    git("checkout", "--", "params.yaml", "dvc.lock", "metrics", "plots")
    subprocess.run(["dvc", "checkout", "-q"], check=True)
