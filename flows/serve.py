"""Serve the deployments until stopped (Ctrl-C / SIGTERM):

- ``continual_learning/scheduled``: the whole sequence on ``params.yaml:flow.cron`` (or every
  ``flow.interval_seconds`` when cron is empty); DVC skips what is up to date, so a run with
  nothing new is a no-op of a few seconds;
- ``inbox/inbox``: every ``flow.inbox_interval_seconds``, turns a full inbox into the next cycle.

    python -m flows.serve [--project DIR]

Needs a Prefect API to register with: ``prefect server start --host 127.0.0.1`` and
``PREFECT_API_URL=http://127.0.0.1:4200/api`` (docs/orchestration.md). ``prefect deployment run
continual_learning/scheduled`` triggers a run now.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefect import serve

from flows.continual_learning import continual_learning
from flows.inbox import inbox_flow
from hst.config import FlowConfig, HSTError
from hst.params import load_section


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", default=".")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    root = str(Path(args.project).resolve())
    try:
        cfg = load_section(Path(root) / args.params, "flow", FlowConfig)
    except HSTError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    schedule = {"cron": cfg.cron} if cfg.cron else {"interval": cfg.interval_seconds}
    serve(continual_learning.to_deployment(name="scheduled", parameters={"project": root}, **schedule),
          # One inbox run at a time: a cycle outlasts the polling interval, and a second run would
          # collide with the first on DVC's lock.
          inbox_flow.to_deployment(name="inbox", parameters={"project": root}, interval=cfg.inbox_interval_seconds,
                                   concurrency_limit=1))


if __name__ == "__main__":
    main()
