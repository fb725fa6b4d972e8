"""Regenerate the README's results table from the cycle metrics (`metrics/eval/<cycle>.json`).

Each variant is read from the workspace, from a DVC experiment (its git ref under `refs/exps`, where
`dvc exp run -n NAME` stores the metrics files) or from a directory that `compare_table.py --export`
filled from one (committed, so the table rebuilds in a fresh clone):

    python -m scripts.results_table --variant "HST=workspace" \
        --variant "dense finetune=docs/runs/dense_finetune" --variant "dense + replay=exp:dense-replay"

The table replaces the text between the results markers in README.md; no number is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import yaml

from hst.io import replace_section


def git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout


def exp_ref(name: str) -> str:
    """The git ref of the newest DVC experiment called ``name``."""
    refs = [r for r in git("for-each-ref", "--sort=committerdate", "--format=%(refname)", "refs/exps").split()
            if r.rsplit("/", 1)[-1] == name]
    if not refs:
        raise SystemExit(f"error: no DVC experiment named {name!r} (run `dvc exp list`)")
    return refs[-1]


def read_text(source: str, path: str) -> str:
    """A file of the workspace (``workspace``), of a DVC experiment (``exp:NAME``) or of a directory
    written by :func:`export` (``metrics/x`` is ``DIR/x`` there, any other path ``DIR/path``)."""
    if source == "workspace":
        return Path(path).read_text()
    if not source.startswith("exp:"):
        file = Path(source) / path.removeprefix("metrics/")
        if not file.is_file():
            raise SystemExit(f"error: {file}: not found (variant directory {source!r}, written by --export)")
        return file.read_text()
    name = source.removeprefix("exp:")
    out = subprocess.run(["git", "show", f"{exp_ref(name)}:{path}"], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"error: experiment {name!r} has no {path}")
    return out.stdout


def export(name: str, dest: Path) -> None:
    """Copy ``params.yaml`` and every file under ``metrics/`` of DVC experiment ``name`` into ``dest``
    (``metrics/`` stripped), so that a run's numbers can be committed next to its table."""
    ref = exp_ref(name)
    for path in ["params.yaml", *git("ls-tree", "-r", "--full-tree", "--name-only", ref, "metrics").split()]:
        target = dest / path.removeprefix("metrics/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(git("show", f"{ref}:{path}"))


def read_metrics(source: str, path: str) -> dict:
    return json.loads(read_text(source, path))


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:+.2f} %"


def table(variants: list[tuple[str, str]], cycles: list[str]) -> str:
    lines = ["| variant | cycle (new domain) | avg forgetting | worst forgetting | absorption (BPB) "
             "| routing stability | experts per layer |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, source in variants:
        for cycle in cycles:
            m = read_metrics(source, f"metrics/eval/{cycle}.json")
            worst = max(m["forgetting"], key=m["forgetting"].get)
            stab = m["routing_stability_mean"]
            lines.append(
                f"| {label} | {cycle} ({m['domain']}) | {pct(m['avg_forgetting'])} | "
                f"{pct(m['worst_forgetting'])} ({worst}) | {m['absorption']:.3f} | "
                f"{'–' if stab is None else f'{100 * stab:.1f} %'} | {'/'.join(map(str, m['experts_per_layer']))} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", required=True, help="LABEL=workspace, LABEL=exp:NAME or LABEL=DIRECTORY")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--readme", default="README.md")
    args = ap.parse_args()
    variants = [tuple(v.split("=", 1)) for v in args.variant]
    cycles = list(yaml.safe_load(Path(args.params).read_text())["cycles"])
    replace_section(args.readme, "results", table(variants, cycles))


if __name__ == "__main__":
    main()
