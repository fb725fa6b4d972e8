"""Helpers shared by the stage CLIs: reading params sections and reporting bad input in one line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import yaml

from hst.config import ConfigError, HSTError, ModelConfig, build
from hst.io import committed_together


def read_params(path: str | Path) -> dict:
    """The whole params file as a mapping of sections."""
    path = Path(path)
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return params


def load_params(path: str | Path, *sections: str) -> tuple[dict, ...]:
    """The named top-level sections of a params file (each must be a mapping)."""
    params = read_params(path)
    out = []
    for name in sections:
        if not isinstance(params.get(name), dict):
            raise ConfigError(f"{path}: section {name!r} missing or not a mapping")
        out.append(params[name])
    return tuple(out)


def model_config(params_path: str | Path) -> ModelConfig:
    """``params.yaml:model``: every checkpoint a stage loads must have been built with it."""
    (section,) = load_params(params_path, "model")
    return build(ModelConfig, section, "params.yaml:model")


def run(main: Callable[[], None]) -> None:
    """Run a stage's main; an input problem becomes ``error: ...`` on stderr and exit code 2.

    Every output is renamed into place together when ``main`` returns (``hst.io.committed_together``):
    a stage that fails or is killed leaves all its outputs at their previous version. The stage also
    dies with the process that started it, so killing `dvc repro` leaves no orphan writing outputs
    that ``dvc.lock`` will not record.
    """
    _die_with_parent()
    try:
        with committed_together():
            main()
    except HSTError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent exits (PR_SET_PDEATHSIG); elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cycle_domain(cycles: dict, key: str) -> str:
    """The incoming domain of cycle ``key`` in the ``cycles`` params section."""
    item = cycles.get(key)
    if not isinstance(item, dict) or not isinstance(item.get("domain"), str):
        raise ConfigError(f"params.yaml:cycles.{key}: expected a mapping with a string 'domain'")
    return item["domain"]
