"""Prefect flow `inbox`: text files dropped into ``params.yaml:flow.inbox`` — and the texts a server
answered, logged under ``params.yaml:serve.log_dir`` (``hst.serving``) — become the next cycle once at
least ``flow.min_inbox_bytes`` are waiting.

A batch is claimed (files moved to ``<inbox>/processed/inboxN/``, see ``hst.inbox``), written as the
corpus file ``data/corpus/inbox/inboxN.txt``, added to ``params.yaml`` as domain ``inboxN`` and as
cycle ``c<k>_inboxN`` after the last cycle, and the continual_learning flow runs. Only the new
domain's ``prepare`` and the new cycle's stages run: every earlier stage reads its own domains
(``data/learned/<cycle>``) and stays up to date. A crash after the
claim is finished on the next run: a claimed batch missing from ``params.yaml`` is added first, and
an inbox cycle in ``params.yaml`` without a gate report (its run died, e.g. on DVC's lock) is run
again. The served deployment runs one inbox flow at a time (``flows.serve``).

    python -m flows.inbox [--project DIR]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed
from ruamel.yaml import YAML

from flows.continual_learning import continual_learning
from hst import data
from hst import inbox as box
from hst.config import FlowConfig, PrepareConfig, ServeConfig
from hst.data import DataError
from hst.io import write_text
from hst.params import load_section


def add_cycle(params_path: Path, domain: str, corpus: str) -> str:
    """Add ``domain`` (reading ``corpus``) to ``prepare.domains`` and a cycle learning it after the last
    one; keep the file's comments and layout. Returns the new cycle's key."""
    yaml = YAML()
    yaml.preserve_quotes = True  # "" stays "" on every line the inbox does not touch
    params = yaml.load(params_path.read_text(encoding="utf-8"))
    params["prepare"]["domains"][domain] = corpus
    cycles = params["cycles"]
    key = f"c{len(cycles) + 1}_{domain}"
    cycles[key] = {"domain": domain, "prev": list(cycles)[-1] if cycles else "pretrain"}
    with open(params_path, "w", encoding="utf-8") as f:
        yaml.dump(params, f)
    return key


def _batches(inbox: Path) -> list[str]:
    done = inbox / "processed"
    names = [p.name for p in done.iterdir() if p.is_dir() and re.fullmatch(r"inbox\d+", p.name)] if done.is_dir() else []
    return sorted(names, key=lambda n: int(n[5:]))


def inbox_dir(root: Path, params_path: Path) -> Path:
    """The project's inbox folder, made if missing (a first run makes the folder people drop files into)."""
    inbox = root / load_section(params_path, "flow", FlowConfig).inbox
    inbox.mkdir(parents=True, exist_ok=True)
    return inbox


def unlearned(root: Path, params_path: Path, inbox: Path) -> list[str]:
    """Inbox cycles in ``params.yaml`` that have no gate report: claimed and added by a run that died
    before learning them (e.g. on DVC's lock)."""
    cycles = load_section(params_path, "cycles")
    return [k for k, c in cycles.items() if (inbox / "processed" / str(c.get("domain"))).is_dir()
            and not (root / f"metrics/gate/{k}.json").is_file()]


def take_batch(root: Path, params_path: Path) -> tuple[list[str], str]:
    """Under the inbox lock: add a claimed batch that is missing from ``params.yaml`` (a crash after the
    claim), or claim a full inbox as a new batch, validated by prepare's own splitting (a batch it
    cannot split is moved to ``processed/rejected/<batch>/`` with its reason and never reaches the
    params). Returns the new cycles' keys and what happened."""
    inbox = inbox_dir(root, params_path)
    with box.locked(inbox):  # a concurrent run waits here, then reads the params and inbox this one left
        cfg = load_section(params_path, "flow", FlowConfig)
        pcfg = load_section(params_path, "prepare", PrepareConfig)
        batches = _batches(inbox)
        unfinished = [b for b in batches if b not in pcfg.domains]
        if not unfinished:
            serve = load_section(params_path, "serve", ServeConfig)
            if serve.log_dir:  # what the server answered waits in the inbox like a dropped file
                box.harvest(root / serve.log_dir, inbox)
            files = box.pending(inbox)
            waiting = sum(f.stat().st_size for f in files)
            if waiting < cfg.min_inbox_bytes:
                return [], f"inbox: {waiting} of {cfg.min_inbox_bytes} bytes waiting; no new cycle"
            batch = f"inbox{int(batches[-1][5:]) + 1 if batches else 1}"
            try:  # prepare's own cut and split
                data.split_docs([box.join_text(files)], pcfg, f"inbox batch {batch}")
            except DataError as e:
                for f in files:
                    box.reject(f, inbox / "processed/rejected" / batch, str(e))
                return [], f"inbox: batch rejected, files moved to processed/rejected/{batch}: {e}"
            box.claim(inbox, batch, only=files)
            unfinished = [batch]
        keys = []
        for batch in unfinished:
            corpus = f"data/corpus/inbox/{batch}.txt"
            write_text(root / corpus, box.batch_text(inbox, batch))
            keys.append(add_cycle(params_path, batch, corpus))
    return keys, f"new cycle(s) {keys} learn {unfinished}"


@flow(name="inbox", log_prints=True)
def inbox_flow(project: str = ".", params: str = "params.yaml"):
    """Turn a full inbox into a new cycle and run the sequence; otherwise report what is waiting."""
    root = Path(project).resolve()
    inbox = inbox_dir(root, root / params)
    try:
        with box.locked(inbox, timeout=0, name=box.RUN_LOCK):
            keys, message = take_batch(root, root / params)
            if not keys and (keys := unlearned(root, root / params, inbox)):
                message = f"inbox: resuming cycle(s) {keys}, claimed but never learned"
            get_run_logger().info(message)
            create_markdown_artifact(key="inbox", markdown=message, description="What this inbox run did")
            if not keys:
                return Completed(message=message)
            return continual_learning(str(root), params=params, return_state=True)
    except TimeoutError:
        message = "inbox: another inbox run is learning a batch; this one does nothing"
        get_run_logger().info(message)
        return Completed(message=message)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", default=".")
    args = ap.parse_args()
    state = inbox_flow(args.project, return_state=True)
    print(state.message)
    sys.exit(0 if state.is_completed() else 1)


if __name__ == "__main__":
    main()
