"""Prefect flow `continual_learning`: pretraining, then every cycle of ``params.yaml:cycles`` as a
chain of tasks, one per DVC stage (learned → collect → learn → evaluate → gate → track → build_index),
each cycle a subflow, so the Prefect UI shows every stage of every cycle with its
state, duration and logs.

Each task runs ``dvc repro --single-item <stage>@<cycle>``: the flow and `dvc repro` run the same
code on the same inputs, lineage stays in ``dvc.lock``, and a re-run after a crash resumes because
DVC skips every stage whose inputs and outputs are unchanged (the flow asks DVC once what changed,
and skips the stages that neither changed nor depend on one that wrote new outputs without a `dvc`
process each).

    python -m flows.continual_learning [--project DIR] [--cycles c1_kjv c2_manpages]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import yaml
from dvc.repo import Repo
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from hst.config import FlowConfig
from hst.params import load_section

# build_index comes last: the index of the cycle's champion, which the next cycle starts with.
CYCLE_STAGES = ("learned", "collect", "learn", "evaluate", "gate", "track", "build_index")
# prepare and learned_pretrain are stage groups (one stage per domain): DVC runs every member.
START = ("check_params", "prepare", "learned_pretrain", "pretrain", "gate_pretrain", "build_index_pretrain")


class StageFailed(RuntimeError):
    """A DVC stage exited with an error; the message names the stage and its last error line."""


PROGRESS_EVERY_S = 15.0  # a stage's progress bar reaches the run's log at most this often
_PROGRESS = re.compile(r"\d+%\|")  # a tqdm line


def run_dvc(project: Path, *args: str, log: Callable[[str], None] | None = None) -> subprocess.CompletedProcess:
    """``dvc *args`` in ``project``; with ``log``, every output line is passed to it as it comes (a
    progress bar's updates at most every :data:`PROGRESS_EVERY_S`, and its last one), so a stage that
    runs for minutes shows its progress on the run page while it runs."""
    # The stages' `python` is this interpreter, whether or not its environment is activated.
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(project),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    cmd = [sys.executable, "-m", "dvc", *args]
    if log is None:
        return subprocess.run(cmd, cwd=project, capture_output=True, text=True, env=env)
    lines, held, last = [], None, 0.0
    # Text mode reads tqdm's carriage-return updates as lines of their own.
    with subprocess.Popen(cmd, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env) as proc:
        for line in proc.stdout:
            line = line.rstrip()
            if not line:
                continue
            lines.append(line)
            if _PROGRESS.search(line):
                if time.monotonic() - last < PROGRESS_EVERY_S:
                    held = line
                    continue
                last = time.monotonic()
            elif held is not None:
                log(held)  # where the bar ended
            held = None
            log(line)
        if held is not None:
            log(held)
    return subprocess.CompletedProcess(cmd, proc.returncode, "\n".join(lines) + "\n", "")


@dataclass(frozen=True)
class Pending:
    """What a flow run must hand to `dvc repro`, from one question to DVC at its start: the stages
    `dvc status` finds changed and every stage's transitive dependencies. A stage runs under DVC when
    it changed or a stage it depends on wrote new outputs in this flow run; every other stage is
    skipped without a `dvc` process (before: one `dvc repro` of ~2 s per finished stage, ~2 of the 14
    minutes of an inbox cycle on the default scenario). New outputs, not "ran": after an inbox drop
    `check_params` runs (it reads the whole params.yaml) and writes the same bytes, and every stage
    depends on it."""

    changed: frozenset[str]  # stage names (``collect@c1``)
    upstream: dict[str, frozenset[str]]  # stage name -> names of the stages it depends on, transitively

    @classmethod
    def of(cls, project: Path) -> "Pending":
        with Repo(str(project)) as repo:
            status = repo.status()  # keyed by stage address, relative to the working directory
            graph = repo.index.graph  # edges point from a stage to the stages it depends on
            return cls(frozenset(s.name for s in graph.nodes if s.addressing in status),
                       {s.name: frozenset(d.name for d in nx.descendants(graph, s)) for s in graph.nodes})

    def must_run(self, target: str, updated: list[str]) -> bool:
        """Whether ``target`` (a stage, or a foreach group: ``prepare`` is every ``prepare@…``) needs
        `dvc repro`, given the stages that wrote new outputs so far; an unknown target does (DVC
        names the problem)."""
        members = [s for s in self.upstream if s == target or s.startswith(f"{target}@")]
        return not members or any(s in self.changed or not self.upstream[s].isdisjoint(updated) for s in members)


def out_hashes(project: Path) -> dict[str, list]:
    """Per stage in ``dvc.lock``, its outputs' hashes."""
    lock = project / "dvc.lock"
    stages = yaml.load(lock.read_text(), Loader=yaml.CSafeLoader)["stages"] if lock.exists() else {}
    return {name: [(o["path"], o.get("md5")) for o in st.get("outs", [])] for name, st in stages.items()}


def run_stage(project: Path, target: str) -> tuple[list[str], list[str]]:
    """``dvc repro --single-item target``: the names of the stages that ran (none: up to date) and
    of those among them whose outputs changed; StageFailed otherwise."""
    before = out_hashes(project)
    proc = run_dvc(project, "repro", "--single-item", target, log=get_run_logger().info)
    if proc.returncode != 0:
        raise StageFailed(f"{target}: {error_line(proc.stdout + proc.stderr) or f'exit code {proc.returncode}'}")
    ran, after = re.findall(r"Running stage '([^']+)'", proc.stdout), out_hashes(project)
    return ran, [name for name in ran if after.get(name) != before.get(name)]


def error_line(output: str) -> str | None:
    """The stage's own one-line error, else the line before DVC's ERROR (a traceback's last line)."""
    lines = [ln for ln in output.splitlines() if ln.strip()]
    ours = [ln for ln in lines if ln.startswith("error:")]
    if ours:
        return ours[-1]
    dvc_err = next((i for i, ln in enumerate(lines) if ln.startswith("ERROR:")), None)
    if dvc_err is None:
        return None
    return lines[dvc_err - 1] if dvc_err > 0 else lines[dvc_err]


@task(task_run_name="{target}", cache_policy=NO_CACHE)
def stage_task(project: str, target: str, needed: bool) -> tuple[list[str], list[str]]:
    """:func:`run_stage`; nothing, without asking DVC, when not ``needed`` (:class:`Pending`)."""
    if not needed:
        get_run_logger().info(f"{target}: up to date")
        return [], []
    return run_stage(Path(project), target)


@flow(name="learn_consolidate_cycle", flow_run_name="cycle {cycle}")
def learn_consolidate_cycle(project: str, cycle: str, retries: int, retry_delay: float,
                            pending: Pending, updated_before: list[str]) -> dict:
    """One cycle: its stages in order; returns the gate decision, the MLflow run of the cycle, what
    each stage did ("ran" or "skipped") and the stages that wrote new outputs. ``pending``,
    ``updated_before`` (the stages that did so earlier in this flow run): see :class:`Pending`."""
    run = stage_task.with_options(retries=retries, retry_delay_seconds=retry_delay)
    done, updated = {}, list(updated_before)
    for stage in CYCLE_STAGES:
        target = f"{stage}@{cycle}"
        ran, new = run(project, target, pending.must_run(target, updated))
        done[stage], updated = "ran" if ran else "skipped", updated + new
    root = Path(project)
    gate = json.loads((root / f"metrics/gate/{cycle}.json").read_text())
    mlflow = json.loads((root / f"metrics/cycles/{cycle}/mlflow.json").read_text())
    logger = get_run_logger()
    for alarm in gate["alarms"]:
        logger.warning(f"alarm in cycle {cycle}: {alarm}")
    if not gate["passed"]:
        logger.warning(f"cycle {cycle} failed its gate ({'; '.join(gate['reasons'])}); champion stays {gate['champion']}")
    return {"cycle": cycle, "passed": gate["passed"], "reasons": gate["reasons"], "alarms": gate["alarms"],
            "champion": gate["champion"], "run_id": mlflow["run_id"], "parent_run_id": mlflow["parent_run_id"],
            "champion_version": mlflow["champion_version"], "stages": done, "updated": updated[len(updated_before):]}


@flow(name="continual_learning", log_prints=True)
def continual_learning(project: str = ".", cycles: list[str] | None = None, params: str = "params.yaml"):
    """Pretraining (if not up to date) and then ``cycles`` (default: all of ``params.yaml:cycles``).

    The final state's message lists every cycle's gate decision and any alarm; its data is the list
    of per-cycle results.
    """
    root = Path(project).resolve()
    cfg = load_section(root / params, "flow", FlowConfig)
    all_cycles = load_section(root / params, "cycles")
    run = stage_task.with_options(retries=cfg.retries, retry_delay_seconds=cfg.retry_delay_seconds)
    pending, updated = Pending.of(root), []
    for target in START:
        updated += run(str(root), target, pending.must_run(target, updated))[1]
    results = []
    for c in cycles or list(all_cycles):
        results.append(learn_consolidate_cycle(str(root), c, cfg.retries, cfg.retry_delay_seconds, pending, updated))
        updated += results[-1]["updated"]
    # The run page's Artifacts tab shows every cycle's decision, not only the final log line.
    create_table_artifact(key="gate-decisions", description="Promotion gate of each cycle in this run", table=[
        {"cycle": r["cycle"], "decision": "promoted" if r["passed"] else "rejected", "champion": r["champion"],
         "reasons": "; ".join(r["reasons"]) or "none", "alarms": "; ".join(r["alarms"]) or "none", "mlflow run": r["run_id"]}
        for r in results])
    # A cycle with an alarm names the final state, so the run list shows it without opening the run.
    alarmed = any(r["alarms"] for r in results)
    return Completed(message=summary(results), data=results, name="Completed with alarms" if alarmed else "Completed")


def summary(results: list[dict]) -> str:
    """One line per cycle: gate decision, champion, alarms."""
    lines = []
    for r in results:
        gate = "promoted" if r["passed"] else f"rejected ({'; '.join(r['reasons'])})"
        alarm = f"; ALARM: {'; '.join(r['alarms'])}" if r["alarms"] else ""
        lines.append(f"{r['cycle']}: {gate}, champion {r['champion']}{alarm}")
    return "\n".join(lines) or "no cycles"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", default=".")
    ap.add_argument("--cycles", nargs="*", help="cycle keys to run (default: all in params.yaml)")
    args = ap.parse_args()
    state = continual_learning(args.project, args.cycles, return_state=True)
    print(state.message)
    sys.exit(0 if state.is_completed() else 1)


if __name__ == "__main__":
    main()
