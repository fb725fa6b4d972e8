"""The MLflow model registry's mirror of the promotion gate.

Every cycle's checkpoint becomes a version of the variant's registered model, logged as an MLflow
model that serves it (``hst.serving``); the alias ``champion`` always points at a version whose
checkpoint is byte-identical (same md5) to the champion file the gate stage wrote, so the registry
follows the gate and never decides anything itself.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from hst.tracking import check_store, one_line_errors

CHAMPION = "champion"


def md5(path: str | Path) -> str:
    """The file's md5: the hash DVC records for a file output."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def register_cycle(uri: str, registered_model: str, run_id: str, cycle: str, checkpoint: Path, champion: Path,
                   gate: dict, package: Callable[[Path, Path], None]) -> dict:
    """Log ``checkpoint`` (the cycle's final one) to the cycle's run ``run_id`` as an MLflow model and
    mirror the gate in the registry: ``champion`` is the champion file after the gate, ``gate["champion"]``
    its cycle. ``package(checkpoint, folder)`` writes the model folder serving a checkpoint
    (:func:`hst.serving.save_model`). Returns the registered version of this cycle and the version
    ``champion`` points to."""
    check_store(uri)
    with one_line_errors(uri):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        _log_model(client, run_id, checkpoint, "model", package)
        version, champion_version = _mirror_gate(client, registered_model, run_id, cycle, checkpoint, champion,
                                                 gate, package)
        return {"registered_model": registered_model, "version": version, "champion_version": champion_version}


def _log_model(client: MlflowClient, run_id: str, checkpoint: Path, artifact_path: str,
               package: Callable[[Path, Path], None]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        package(checkpoint, Path(tmp) / artifact_path)
        client.log_artifacts(run_id, str(Path(tmp) / artifact_path), artifact_path)


def _mirror_gate(client: MlflowClient, name: str, run_id: str, cycle: str, checkpoint: Path,
                 champion: Path, gate: dict, package: Callable[[Path, Path], None]) -> tuple[str, str]:
    """Register this cycle's checkpoint; point ``champion`` at the version equal to the champion file.

    A version's source is the MLflow model serving that checkpoint, so ``mlflow models serve -m
    models:/<name>@champion`` serves the champion (its ``artifacts/`` folder holds the checkpoint).

    A passing cycle's checkpoint *is* the champion file, so the alias moves to it; a failing one
    leaves the alias on the previous champion's version. Only when the registry has no version of
    the champion file (the first tracked cycle fails) is that file registered from this run.
    """
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    run = client.get_run(run_id)
    version = client.create_model_version(
        name, f"{run.info.artifact_uri}/model", run_id,
        tags={"cycle": cycle, "md5": md5(checkpoint), "gate": "passed" if gate["passed"] else "failed"}).version
    target = md5(champion)
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        current = None
    matches = [v for v in client.search_model_versions(f"name = '{name}'") if v.tags.get("md5") == target]
    if current is not None and current.tags.get("md5") == target and not gate["passed"]:
        champ = current.version
    elif matches:
        champ = max(matches, key=lambda v: int(v.version)).version
    else:
        _log_model(client, run_id, champion, "champion", package)
        champ = client.create_model_version(
            name, f"{run.info.artifact_uri}/champion", run_id,
            tags={"cycle": gate["champion"], "md5": target, "gate": "champion before tracking"}).version
    client.set_registered_model_alias(name, CHAMPION, champ)
    client.set_tag(run_id, "champion_version", champ)
    return str(version), str(champ)
