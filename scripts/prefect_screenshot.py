"""The screenshots ``docs/prefect_run.png`` and ``docs/prefect_gate_decisions.png``: a
``continual_learning`` flow run's page in the Prefect UI on its Artifacts tab, and the table artifact
``gate-decisions`` it links to (each cycle's gate decision, champion, reasons, alarms, MLflow run).

    export PREFECT_HOME=$PWD/.prefect PREFECT_SERVER_ANALYTICS_ENABLED=false
    prefect server start --host 127.0.0.1 --port 4200 &
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.continual_learning         # a run the server holds (everything up to date: under a minute)
    python -m scripts.prefect_screenshot       # the latest continual_learning run; --run ID for another

Drives headless Chromium (Debian package ``chromium``, ``scripts/browser.py``) against the server
``PREFECT_API_URL`` names; the UI is served at the same address without ``/api``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import urllib.request
from pathlib import Path

from scripts.browser import answers, chromium, wait_for


def latest_run(api: str, flow: str) -> str:
    """The id of ``flow``'s most recent flow run on the server at ``api``."""
    body = json.dumps({"flows": {"name": {"any_": [flow]}}, "sort": "START_TIME_DESC", "limit": 1}).encode()
    request = urllib.request.Request(f"{api}/flow_runs/filter", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as r:
        runs = json.load(r)
    if not runs:
        raise SystemExit(f"error: {api}: no {flow} flow run yet (run python -m flows.continual_learning first)")
    return runs[0]["id"]


def click(selector: str, text: str) -> str:
    """JavaScript: click the last element matching ``selector`` whose own text is ``text``; true, or null
    while there is none."""
    return (f"(() => {{ const e = [...document.querySelectorAll({json.dumps(selector)})].filter(e => "
            f"e.childElementCount === 0 && e.textContent.trim() === {json.dumps(text)}).pop(); "
            f"if (!e) return null; e.click(); return true; }})()")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--api", default=os.environ.get("PREFECT_API_URL", ""), help="default: $PREFECT_API_URL")
    ap.add_argument("--run", help="flow run id (default: the latest continual_learning run)")
    ap.add_argument("--size", default="1600x1000", help="window WIDTHxHEIGHT in pixels")
    ap.add_argument("--out", type=Path, default=Path("docs/prefect_run.png"))
    ap.add_argument("--table-out", type=Path, default=Path("docs/prefect_gate_decisions.png"))
    args = ap.parse_args()
    if not args.api:
        raise SystemExit("error: no Prefect server: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api) or --api")
    api = args.api.rstrip("/")
    wait_for(f"the Prefect server at {api}", lambda: answers(f"{api}/health"), timeout=10)
    run = args.run or latest_run(api, "continual_learning")
    width, height = map(int, args.size.split("x"))
    with chromium((width, height)) as page:
        page.open(f"{api.removesuffix('/api')}/runs/flow-run/{run}", "the Prefect UI")
        # The tabs are list items that switch on click (a ?tab= in the address is not honoured on load).
        wait_for("the run's tabs", lambda: page.js(click("li.p-tab", "Artifacts")))
        wait_for("the gate decisions", lambda: page.js("document.body.innerText.includes('gate-decisions') || null"))
        time.sleep(2)
        page.capture(args.out)
        page.js(click("*", "gate-decisions"))
        wait_for("the gate decisions' table", lambda: page.js("document.querySelector('table') && true || null"))
        time.sleep(2)
        page.capture(args.table_out)
    print(args.out, args.table_out)


if __name__ == "__main__":
    main()
