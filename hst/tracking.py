"""MLflow tracking of learn–consolidate cycles (the registry's mirror of the gate is ``hst.registry``).

One experiment per scenario, shared by all its variants (HST, dense finetune, dense + replay, ...),
so one view compares them; one parent run per *sequence* of a variant (found by a key of the variant
and its settings, so cycles run by separate `dvc repro` or flow invocations land under one parent),
named after the variant and holding every cycle's metrics at ``step = cycle index`` (a line per
variant across cycles in MLflow's chart view); one child run per cycle with the same metrics, its
artifacts and its lineage tags.

Functions take explicit URIs, paths, dicts and environments; nothing here reads params files or
``os.environ``.
"""

from __future__ import annotations

import hashlib
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from hst.config import HSTError

REACH_TIMEOUT_S = 10.0  # how long a tracking server may take to answer before a cycle's logging gives up
DEFAULT_STORE = "sqlite:///mlflow.db"  # relative to the project
SQLITE = "sqlite:///"  # + the database file's path: relative, or absolute with a fourth slash
# The params sections that decide how cycles learn: a sequence's key hashes them.
SEQUENCE_SECTIONS = ("model", "pretrain", "cycle", "consolidate", "grow", "gate")


class TrackingError(HSTError):
    """The MLflow store cannot be reached or refused a write."""


# MLflow's HTTP client waits 120 s a request and retries 7 times with backoff: a server that answers
# /health but hangs (or answers 500) on its API held a cycle's logging for 4-20 min. These bound it.
CLIENT_LIMITS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def client_limits(environ: Mapping[str, str]) -> dict[str, str]:
    """The MLflow client settings to apply (``os.environ.update``): :data:`CLIENT_LIMITS` unless
    ``environ`` sets them already."""
    return {k: environ.get(k, v) for k, v in CLIENT_LIMITS.items()}


def check_store(uri: str, timeout: float = REACH_TIMEOUT_S) -> None:
    """Fail fast, in one line, when the store at ``uri`` cannot be used: an http(s) server must answer
    ``/health`` within ``timeout`` s (MLflow's own client retries for minutes); a SQLite file's folder must exist."""
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
                pass
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingError(f"{uri}: MLflow tracking server not reachable within {timeout:.0f} s ({reason}); "
                                "start it or set MLFLOW_TRACKING_URI") from None
    elif (db := sqlite_path(uri)) is not None:
        folder = db.parent
        if not folder.is_dir():
            raise TrackingError(f"{uri}: folder {folder} of the SQLite store does not exist")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a SQLite store's URI; None for any other store."""
    return Path(uri[len(SQLITE):]) if uri.startswith(SQLITE) else None


def store_uri(environ: Mapping[str, str], cwd: Path) -> str:
    """The store to log to: ``$MLFLOW_TRACKING_URI``, else :data:`DEFAULT_STORE`; a relative SQLite
    path in either is made absolute against ``$DVC_ROOT`` (else ``cwd``).

    DVC sets ``DVC_ROOT`` to the original project for every stage it runs, also when `dvc exp run
    --temp` or a queued experiment runs it in a temporary copy: so every variant reaches the project's
    store, where a relative path would log into the copy and vanish with it.
    """
    uri = environ.get("MLFLOW_TRACKING_URI") or DEFAULT_STORE
    db = sqlite_path(uri)
    if db is None or db.is_absolute():
        return uri
    return f"{SQLITE}{(Path(environ.get('DVC_ROOT') or cwd) / db).resolve()}"


def sequence_params(params: dict) -> dict:
    """The sections of a params file logged on a sequence's parent run: those that decide how cycles
    learn, and the tracking names (what dvc.yaml declares for the `track` stage)."""
    return {s: v for s, v in params.items() if s in (*SEQUENCE_SECTIONS, "tracking")}


def sequence_key(params: dict, variant: str) -> str:
    """The key of ``variant``'s sequence: the same for every cycle run with the same settings, new for
    changed settings or another variant (so identical settings under two names stay two lines)."""
    keyed = {"variant": variant, **{s: params.get(s) for s in SEQUENCE_SECTIONS}}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:16]


_BATCH = 1000  # MLflow's limit of metrics per log_batch call


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """Nested params as MLflow params: ``{"cycle.mode": "experts", ...}``."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)
    return out


def cycle_metrics(report: dict) -> dict[str, float]:
    """The metrics of one cycle's evaluation report, flat MLflow keys -> values."""
    out = {f"bpb.{d}": v for d, v in report["bpb"].items()}
    out |= {f"forgetting.{d}": v for d, v in report["forgetting"].items()}
    for key in ("avg_forgetting", "worst_forgetting", "absorption", "backward_transfer", "forward_transfer"):
        out[key] = report[key]
    if report.get("routing_stability_mean") is not None:
        out["routing_stability"] = report["routing_stability_mean"]
    for i, v in enumerate(report.get("routing_stability", [])):
        out[f"routing_stability.layer{i}"] = v
    for layer in report.get("usage", []):
        out |= {f"{name}.layer{layer['layer']}": layer[name] for name in ("itjd", "rmi", "eff_k")
                if layer.get(name) is not None}
    out |= {f"experts.layer{i}": n for i, n in enumerate(report["experts_per_layer"])}
    if report.get("novelty_rate") is not None:
        out["novelty_rate"] = report["novelty_rate"]  # share of incoming records above the novelty threshold
    if report.get("growth"):  # grow.decide: novelty: did the cycle grow a path, and how many did it consolidate
        out["grew_path"] = report["growth"]["grown_path"] is not None
        out["consolidated_paths"] = len(report["growth"]["consolidated"])
    if report.get("inference"):
        out["paths"] = report["inference"]["paths"]
    return {k: float(v) for k, v in out.items()}


def curve_metrics(rows: list[dict], prefix: str, x: str = "step") -> list[Metric]:
    """Every numeric column of a curve table (``plots/*.csv`` rows) as step metrics ``prefix.column``."""
    now = int(time.time() * 1000)
    return [Metric(f"{prefix}.{k}", float(v), now, int(row[x]))
            for row in rows for k, v in row.items() if k != x and isinstance(v, (int, float))]


def _log_metrics(client: MlflowClient, run_id: str, metrics: list[Metric]) -> None:
    for i in range(0, len(metrics), _BATCH):
        client.log_batch(run_id, metrics=metrics[i:i + _BATCH])


# MLflow 3's UI opens an experiment of no declared kind on its GenAI traces page; this kind opens the
# runs table and charts ("Model training").
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def _experiment_id(client: MlflowClient, uri: str, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp:
        if not set(EXPERIMENT_KIND) <= set(exp.tags):  # made by an earlier version, or by hand
            for k, v in EXPERIMENT_KIND.items():
                client.set_experiment_tag(exp.experiment_id, k, v)
        return exp.experiment_id
    # MLflow puts a SQLite store's artifacts under the *current* folder's mlruns/; a temporary
    # experiment copy would take them away with it, so they go next to the store instead.
    db = sqlite_path(uri)
    return client.create_experiment(name, None if db is None else str(db.parent / "mlruns"), tags=EXPERIMENT_KIND)


def sequence_run(client: MlflowClient, experiment_id: str, variant: str, key: str, params: dict,
                 curves: dict[str, list[dict]]) -> str:
    """The parent run of ``variant``'s sequence ``key``: found by its tag, else created, named after the
    variant, with the params (logged once, flattened) and the pretraining curves
    (``{"pretrain.train": rows, ...}``)."""
    found = client.search_runs([experiment_id], f"tags.`hst.sequence` = '{key}' and tags.`hst.role` = 'sequence'",
                               max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=variant,
                            tags={"hst.sequence": key, "hst.role": "sequence", "variant": variant})
    flat = flatten(params)
    items = [Param(k, v[:6000]) for k, v in sorted(flat.items())]
    for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    _log_metrics(client, run.info.run_id, [m for prefix, rows in curves.items() for m in curve_metrics(rows, prefix)])
    return run.info.run_id


def tracked_cycles(uri: str, experiment: str, key: str) -> set[str]:
    """The cycles sequence ``key`` already has a child run for."""
    check_store(uri)
    with one_line_errors(uri):
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return set()
        runs = client.search_runs([exp.experiment_id], f"tags.`hst.sequence` = '{key}' and tags.`hst.role` = 'cycle'")
        return {r.data.tags["hst.cycle"] for r in runs}


def log_cycle(uri: str, experiment: str, variant: str, key: str, params: dict,
              pretrain_curves: dict[str, list[dict]], cycle: str, index: int, report: dict, gate: dict,
              curves: dict[str, list[dict]], artifacts: list[Path], tags: dict[str, str]) -> dict:
    """Log cycle ``cycle`` (the ``index``-th) of ``variant``'s sequence ``key`` as a child run.

    ``params``: the sequence's params (:func:`sequence_params`); ``report``: the evaluation report;
    ``gate``: the gate stage's decision (``passed``, ``reasons``, ``alarms``); ``curves``: training
    curves of the cycle's stages by name. The parent run gets the cycle's metrics at ``step = index``.
    Returns the experiment and the run ids. An unreachable or failing store is a one-line
    :class:`TrackingError`.
    """
    check_store(uri)
    with one_line_errors(uri):
        client = MlflowClient(tracking_uri=uri)
        exp_id = _experiment_id(client, uri, experiment)
        parent = sequence_run(client, exp_id, variant, key, params, pretrain_curves)
        run_tags = {"mlflow.parentRunId": parent, "hst.sequence": key, "variant": variant, "hst.cycle": cycle,
                    "hst.cycle_index": str(index), "hst.role": "cycle", "gate": "passed" if gate["passed"] else "failed",
                    "gate.reasons": "; ".join(gate["reasons"]) or "-", "alarm": "; ".join(gate["alarms"]) or "-", **tags}
        # Named with the variant: a compare view of several variants' cycles tells them apart.
        run_id = client.create_run(exp_id, run_name=f"{variant}: {cycle}", tags=run_tags).info.run_id
        values = cycle_metrics(report)
        now = int(time.time() * 1000)
        # The parent holds the same values at step = cycle index: one line per variant across the sequence.
        for rid in (run_id, parent):
            _log_metrics(client, rid, [Metric(k, v, now, index) for k, v in values.items()])
        _log_metrics(client, run_id, [m for prefix, rows in curves.items() for m in curve_metrics(rows, prefix)])
        for path in artifacts:
            client.log_artifact(run_id, str(path), "evaluation")
        client.set_terminated(run_id)
        # The parent is FINISHED after each cycle (a later cycle still logs to it): a sequence has no
        # end MLflow could know of, and a parent left RUNNING read as a run that never ended.
        client.set_terminated(parent)
        return {"experiment": experiment, "experiment_id": exp_id, "variant": variant, "parent_run_id": parent,
                "run_id": run_id}


@contextmanager
def one_line_errors(uri: str):
    try:
        yield
    except MlflowException as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise TrackingError(f"{uri}: MLflow refused a request ({first[:300]})") from None
