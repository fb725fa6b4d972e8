"""Helpers shared by the stage CLIs: reading params sections and reporting bad input in one line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import yaml

from hst.config import ConfigError, HSTError


def load_params(path: str | Path, *sections: str) -> tuple[dict, ...]:
    """The named top-level sections of a params file (each must be a mapping)."""
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
    out = []
    for name in sections:
        if not isinstance(params.get(name), dict):
            raise ConfigError(f"{path}: section {name!r} missing or not a mapping")
        out.append(params[name])
    return tuple(out)


def run(main: Callable[[], None]) -> None:
    """Run a stage's main; an input problem becomes ``error: ...`` on stderr and exit code 2."""
    try:
        main()
    except HSTError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cycle_domain(cycles: dict, key: str) -> str:
    """The incoming domain of cycle ``key`` in the ``cycles`` params section."""
    item = cycles.get(key)
    if not isinstance(item, dict) or not isinstance(item.get("domain"), str):
        raise ConfigError(f"params.yaml:cycles.{key}: expected a mapping with a string 'domain'")
    return item["domain"]
