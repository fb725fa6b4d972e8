"""The screenshot ``docs/mlflow_compare.png``: MLflow's chart view of every variant across the cycles.

    python -m scripts.results_table --mlflow --variant "dense finetune=docs/runs/pareto_2threads/dense_finetune_1x" \\
        --variant "dense + replay=docs/runs/pareto_2threads/dense_replay_1x"     # fill the store
    python -m scripts.mlflow_screenshot                                   # take the screenshot

Copies the SQLite store to a temporary folder (the UI never opens the project's store), colours the
variants' parent runs there (tag ``mlflow.runColor``, what the UI's colour picker sets), starts
``mlflow server`` on 127.0.0.1 against the copy and drives headless Chromium (Debian package
``chromium``, ``scripts/browser.py``) over the DevTools protocol. Before the page loads, the experiment page's saved state is
written into the browser's local storage: parent runs only (one per variant), and one section of
line charts of ``--metrics`` against ``step`` = cycle. That layout is the MLflow 3.17 UI's own and
may move in another MLflow version.
"""

from __future__ import annotations

import argparse
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
from pathlib import Path

from mlflow import MlflowClient
from hst.tracking import SQLITE, sqlite_path, store_uri
from scripts.browser import answers, chromium, wait_for

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


def screenshot(db: Path, experiment: str, metrics: list[str], out: Path, size: tuple[int, int]) -> None:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", metavar="URI", help="SQLite store (default: as the track stage: $MLFLOW_TRACKING_URI, "
                                                  "else the project's mlflow.db)")
    ap.add_argument("--experiment", default="hst")
    ap.add_argument("--metrics", nargs="+", default=METRICS)
    ap.add_argument("--size", default="1920x1150", help="window WIDTHxHEIGHT in pixels")
    ap.add_argument("--out", type=Path, default=Path("docs/mlflow_compare.png"))
    args = ap.parse_args()
    uri = args.store or store_uri(os.environ, Path.cwd())
    if (db := sqlite_path(uri)) is None:
        raise SystemExit(f"error: {uri}: a SQLite store is needed (it is copied)")
    width, height = map(int, args.size.split("x"))
    screenshot(db, args.experiment, args.metrics, args.out, (width, height))
    print(args.out)


if __name__ == "__main__":
    main()
