"""Helpers shared by the stage CLIs: the expected model config, one-line errors, outputs committed together."""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import Callable

from hst.config import ConfigError, HSTError, ModelConfig
from hst.io import committed_together
from hst.params import load_section


def model_config(params_path: str | Path) -> ModelConfig:
    """``params.yaml:model``: every checkpoint a stage loads must have been built with it."""
    return load_section(params_path, "model", ModelConfig)


def run(main: Callable[[], None]) -> None:
    """Run a stage's main; an input problem becomes ``error: ...`` on stderr and exit code 2.

    Every output is renamed into place together when ``main`` returns (``hst.io.committed_together``):
    a stage that fails or is killed leaves all its outputs at their previous version. (The stage also
    dies with the process that started it: see ``stages/__init__.py``.)
    """
    try:
        with committed_together():
            main()
    except HSTError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: {e.filename or 'an output'}: no space left on its disk ({e.strerror}); "
              "the previous outputs are unchanged", file=sys.stderr)
        sys.exit(2)


def cycle_domain(cycles: dict, key: str) -> str:
    """The incoming domain of cycle ``key`` in the ``cycles`` params section."""
    item = cycles.get(key)
    if not isinstance(item, dict) or not isinstance(item.get("domain"), str):
        raise ConfigError(f"params.yaml:cycles.{key}: expected a mapping with a string 'domain'")
    return item["domain"]
