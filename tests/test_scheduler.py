"""A real `prefect server` schedules a served deployment by itself (no `prefect deployment run`).

With SQLAlchemy 2.1 Prefect 3.8's scheduler service fails every loop ("Can't evaluate bulk DML
statement") and never creates a SCHEDULED run, though deployments show active schedules; the
project pins SQLAlchemy 2.0 (pyproject.toml). This test starts the server on a free loopback port,
serves a trivial flow with a 5 s interval schedule and waits for a run to complete on its own.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

SERVE = """
from prefect import flow

@flow
def tick():
    return 1

if __name__ == "__main__":  # a served run imports this file to find the flow
    tick.serve(name="every-5s", interval=5)
"""


# The scheduler creates many future runs ahead: ask for completed ones only.
COMPLETED = json.dumps({"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}, "limit": 5}).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                pytest.fail(f"{what}: a process exited with {proc.returncode}")
        result = check()
        if result:
            return result
        time.sleep(1)
    pytest.fail(f"{what}: not within {timeout:.0f} s")


@pytest.mark.slow
def test_the_server_schedules_and_runs_a_served_deployment_by_itself(tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
           "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false", "PREFECT_SERVER_SERVICES_FOREMAN_ENABLED": "false"}
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    procs = [server]
    try:
        def healthy():
            try:
                return urllib.request.urlopen(f"{api}/health", timeout=2).status == 200
            except OSError:
                return False
        wait_for(healthy, 120, "prefect server health", procs)
        (tmp_path / "serve.py").write_text(SERVE)
        procs.append(subprocess.Popen([sys.executable, str(tmp_path / "serve.py")], env=env, cwd=tmp_path,
                                      stdout=log, stderr=subprocess.STDOUT))

        def completed_run():
            req = urllib.request.Request(f"{api}/flow_runs/filter", method="POST", data=COMPLETED,
                                         headers={"Content-Type": "application/json"})
            runs = json.loads(urllib.request.urlopen(req, timeout=5).read())
            return [r for r in runs if r.get("deployment_id")]
        runs = wait_for(completed_run, 150, "a scheduled run completed by itself", procs)
        assert runs[0]["auto_scheduled"] is True
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
        assert "bulk DML" not in (tmp_path / "server.log").read_text()
