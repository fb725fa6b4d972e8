"""Regenerate the README's results table from the cycle metrics (`metrics/eval/<cycle>.json`).

Each variant is read either from the workspace or from a DVC experiment (its git ref under
`refs/exps`, where `dvc exp run -n NAME` stores the metrics files):

    python scripts/results_table.py --variant "HST=workspace" \
        --variant "dense finetune=exp:dense-finetune" --variant "dense + replay=exp:dense-replay"

The table replaces the text between the results markers in README.md; no number is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import yaml

from hst.io import replace_section


def read_text(source: str, path: str) -> str:
    """A file of the workspace (``workspace``) or of a DVC experiment (``exp:NAME``)."""
    if source == "workspace":
        return Path(path).read_text()
    name = source.removeprefix("exp:")
    refs = subprocess.run(["git", "for-each-ref", "--sort=committerdate", "--format=%(refname)", "refs/exps"],
                          capture_output=True, text=True, check=True).stdout.split()
    matches = [r for r in refs if r.rsplit("/", 1)[-1] == name]  # newest last
    if not matches:
        raise SystemExit(f"error: no DVC experiment named {name!r} (run `dvc exp list`)")
    out = subprocess.run(["git", "show", f"{matches[-1]}:{path}"], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"error: experiment {name!r} has no {path}")
    return out.stdout


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
    ap.add_argument("--variant", action="append", required=True, help="LABEL=workspace or LABEL=exp:NAME")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--readme", default="README.md")
    args = ap.parse_args()
    variants = [tuple(v.split("=", 1)) for v in args.variant]
    cycles = list(yaml.safe_load(Path(args.params).read_text())["cycles"])
    replace_section(args.readme, "results", table(variants, cycles))


if __name__ == "__main__":
    main()
