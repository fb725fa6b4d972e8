"""The documentation's screenshots, taken in headless Chromium (Debian package ``chromium``:
``apt-get install chromium``) driven over the DevTools protocol.

    python -m scripts.screenshots mlflow     # docs/mlflow_compare.png: MLflow's chart view of every variant
    python -m scripts.screenshots prefect    # docs/prefect_run.png, docs/prefect_gate_decisions.png

**mlflow**: fill the store first (``docs/mlflow.md``)::

    python -m scripts.results_table --mlflow --variant "dense finetune=docs/runs/pareto_2threads/dense_finetune_1x" \\
        --variant "dense + replay=docs/runs/pareto_2threads/dense_replay_1x"

It copies the SQLite store to a temporary folder (the UI never opens the project's store), colours
the variants' parent runs there (tag ``mlflow.runColor``, what the UI's colour picker sets), starts
``mlflow server`` on 127.0.0.1 against the copy and, before the page loads, writes the experiment
page's saved state into the browser's local storage: parent runs only (one per variant), and one
section of line charts of ``--metrics`` against ``step`` = cycle. That layout is the MLflow 3.17
UI's own and may move in another MLflow version.

**prefect**: a ``continual_learning`` flow run's page in the Prefect UI on its Artifacts tab, and the
table artifact ``gate-decisions`` it links to (each cycle's gate decision, champion, reasons, alarms,
MLflow run), from the server ``PREFECT_API_URL`` names (the UI is the same address without ``/api``)::

    export PREFECT_HOME=$PWD/.prefect PREFECT_SERVER_ANALYTICS_ENABLED=false
    prefect server start --host 127.0.0.1 --port 4200 &
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.continual_learning         # a run the server holds (everything up to date: under a minute)
    python -m scripts.screenshots prefect      # the latest continual_learning run; --run ID for another
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mlflow import MlflowClient
from websockets.sync.client import connect

from hst.tracking import SQLITE, sqlite_path, store_uri


class Page:
    """One Chromium tab over the DevTools protocol."""

    def __init__(self, ws_url: str):
        self.ws, self.n = connect(ws_url, max_size=2 ** 28), 0

    def call(self, method: str, **params) -> dict:
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:  # events arrive in between; the answer carries our id
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def js(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def open(self, url: str, what: str) -> None:
        """Navigate to ``url`` and wait until its document has loaded."""
        self.call("Page.navigate", url=url)
        wait_for(what, lambda: self.js("document.readyState === 'complete' || null"))

    def capture(self, out: Path) -> None:
        out.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))


def wait_for(what: str, ready: Callable[[], object], timeout: float = 60.0):
    """Poll ``ready`` until it returns something other than None; exit with one line after ``timeout`` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (value := ready()) is not None:
            return value
        time.sleep(0.5)
    raise SystemExit(f"error: {what} did not come up within {timeout:.0f} s")


def answers(url: str) -> bool | None:
    """True once ``url`` answers an HTTP GET, else None (for :func:`wait_for`)."""
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return None


@contextmanager
def chromium(size: tuple[int, int]) -> Iterator[Page]:
    """A headless Chromium with a fresh profile, its one tab ``size`` = (width, height) pixels."""
    # Chromium's helper processes may still write to the profile as it exits: its removal is best effort.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        profile = Path(tmp) / "chromium"
        browser = subprocess.Popen(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
             "--remote-debugging-port=0", "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port_file = profile / "DevToolsActivePort"
            devtools = wait_for("chromium", lambda: port_file.read_text().split()[0] if port_file.is_file() else None)
            targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{devtools}/json"))
            page = Page(next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page"))
            page.call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1], deviceScaleFactor=1,
                      mobile=False)
            yield page
        finally:
            browser.terminate()
            browser.wait()


METRICS = ["avg_forgetting", "worst_forgetting", "absorption", "routing_stability", "bpb.kjv", "bpb.shakespeare"]
COLOURS = ["#1f77b4", "#d62728", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b"]  # variants in the order they were logged
PARENTS = "tags.`hst.role` = 'sequence'"
SECTION = "hst-cycles"


def view_state(metrics: list[str]) -> dict:
    """The experiment page's state: chart view of the parent runs, one line chart per metric."""
    charts = [{"uuid": f"hst-{m}", "type": "LINE", "metricKey": m, "displayName": m, "metricSectionId": SECTION,
               "runsCountToCompare": 10, "deleted": False, "isGenerated": False, "lineSmoothness": 0,
               "xAxisKey": "step", "xAxisScaleType": "linear", "scaleType": "linear", "selectedXAxisMetricKey": "",
               "yAxisKey": "metric", "yAxisExpressions": [], "range": {}, "ignoreOutliers": False,
               "useGlobalXaxisKey": True, "useGlobalLineSmoothing": True} for m in metrics]
    return {"searchFilter": PARENTS, "orderByKey": "attributes.start_time", "orderByAsc": True, "startTime": "ALL",
            "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
            "compareRunCharts": charts, "isAccordionReordered": False, "hideEmptyCharts": True,
            "compareRunSections": [{"uuid": SECTION, "name": "Across cycles (step = cycle)", "display": True,
                                    "isReordered": False, "deleted": False, "isGenerated": False,
                                    "columns": 3, "cardHeight": 390}],
            "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""}}


def mlflow_screenshot(db: Path, experiment: str, metrics: list[str], out: Path, size: tuple[int, int]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "mlflow.db"
        shutil.copy(db, copy)
        client = MlflowClient(f"{SQLITE}{copy}")
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise SystemExit(f"error: {db}: no experiment {experiment!r} (fill it first, see --help)")
        for run, colour in zip(client.search_runs([exp.experiment_id], PARENTS, order_by=["attributes.start_time ASC"]),
                               COLOURS):
            client.set_tag(run.info.run_id, "mlflow.runColor", colour)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"{SQLITE}{copy}"], cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        try:
            wait_for("mlflow server", lambda: answers(f"{url}/health"))
            with chromium(size) as page:
                page.open(f"{url}/", "the MLflow UI")
                storage = {f'MLflowLocalStorage-1.1-ExperimentPage-["{exp.experiment_id}"]-ReactComponentState':
                           json.dumps(view_state(metrics)),
                           "mlflow.workflowType_v1": json.dumps("machine_learning"),  # the "Model training" side bar
                           "mlflow.assistant.panelOpen_v1": "false", "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true"}
                page.js(";".join(f"localStorage.setItem({json.dumps(k)}, {json.dumps(v)})" for k, v in storage.items()))
                query = urllib.parse.urlencode({"compareRunsMode": "CHART", "workflowType": "machine_learning",
                                                "searchFilter": PARENTS, "orderByKey": "attributes.start_time",
                                                "orderByAsc": "true"})
                page.call("Page.navigate", url=f"{url}/#/experiments/{exp.experiment_id}/runs?{query}")
                # Every chart has drawn its lines (an SVG path per run) once the metric histories arrived.
                wait_for("the charts", lambda: page.js(
                    f"document.querySelectorAll('.js-plotly-plot .scatterlayer .trace').length >= {len(metrics)} || null"))
                # Plotly's per-chart toolbar would cover the lines.
                page.js("document.head.insertAdjacentHTML('beforeend', '<style>.modebar-container{display:none}</style>')")
                time.sleep(3)
                page.capture(out)
        finally:
            server.terminate()
            server.wait()


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


def prefect_screenshots(api: str, run: str | None, size: tuple[int, int], out: Path, table_out: Path) -> None:
    wait_for(f"the Prefect server at {api}", lambda: answers(f"{api}/health"), timeout=10)
    run = run or latest_run(api, "continual_learning")
    with chromium(size) as page:
        page.open(f"{api.removesuffix('/api')}/runs/flow-run/{run}", "the Prefect UI")
        # The tabs are list items that switch on click (a ?tab= in the address is not honoured on load).
        wait_for("the run's tabs", lambda: page.js(click("li.p-tab", "Artifacts")))
        wait_for("the gate decisions", lambda: page.js("document.body.innerText.includes('gate-decisions') || null"))
        time.sleep(2)
        page.capture(out)
        page.js(click("*", "gate-decisions"))
        wait_for("the gate decisions' table", lambda: page.js("document.querySelector('table') && true || null"))
        time.sleep(2)
        page.capture(table_out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="ui", required=True)
    ml = sub.add_parser("mlflow", help="MLflow's chart view of every variant across the cycles")
    ml.add_argument("--store", metavar="URI", help="SQLite store (default: as the track stage: $MLFLOW_TRACKING_URI, "
                                                  "else the project's mlflow.db)")
    ml.add_argument("--experiment", default="hst")
    ml.add_argument("--metrics", nargs="+", default=METRICS)
    ml.add_argument("--size", default="1920x1150", help="window WIDTHxHEIGHT in pixels")
    ml.add_argument("--out", type=Path, default=Path("docs/mlflow_compare.png"))
    pf = sub.add_parser("prefect", help="a continual_learning run's page and its gate-decisions table")
    pf.add_argument("--api", default=os.environ.get("PREFECT_API_URL", ""), help="default: $PREFECT_API_URL")
    pf.add_argument("--run", help="flow run id (default: the latest continual_learning run)")
    pf.add_argument("--size", default="1600x1000", help="window WIDTHxHEIGHT in pixels")
    pf.add_argument("--out", type=Path, default=Path("docs/prefect_run.png"))
    pf.add_argument("--table-out", type=Path, default=Path("docs/prefect_gate_decisions.png"))
    args = ap.parse_args()
    width, height = map(int, args.size.split("x"))
    if args.ui == "mlflow":
        uri = args.store or store_uri(os.environ, Path.cwd())
        if (db := sqlite_path(uri)) is None:
            raise SystemExit(f"error: {uri}: a SQLite store is needed (it is copied)")
        mlflow_screenshot(db, args.experiment, args.metrics, args.out, (width, height))
        print(args.out)
    else:
        if not args.api:
            raise SystemExit("error: no Prefect server: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api) or --api")
        prefect_screenshots(args.api.rstrip("/"), args.run, (width, height), args.out, args.table_out)
        print(args.out, args.table_out)


if __name__ == "__main__":
    main()
