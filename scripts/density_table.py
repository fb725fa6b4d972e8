"""Write the expert-density comparison (issue 7) into docs/results.md from two or more metrics
directories, each laid out like ``metrics/`` (``pretrain.json``, ``eval/<cycle>.json``):

    dvc exp run --temp -n density-0.05 -S model.expert_density=0.05
    python -m scripts.density_table --export density-0.05=docs/runs/density_0.05 \
        --variant "density 1.0=docs/runs/density_1.0" --variant "density 0.05=docs/runs/density_0.05"

``--export NAME=DIR`` first copies the ``metrics/`` files of the DVC experiment NAME (its git ref
under ``refs/exps``) into DIR, so that the run's numbers can be committed next to the table.

Per variant: validation BPB after pretraining and the connections prune-and-regrow moved; per cycle: average and
worst forgetting of the old domains, absorption (BPB drop on the new domain) and routing
stability; and the mean over cycles. A cycle missing from a directory is shown as missing. The
tables replace the text between the density markers in the results file (created if absent);
no number is typed by hand.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hst.io import replace_section
from hst.params import load_section
from hst.runs import export, pct


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def row(*cells) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def stability(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def tables(variants: list[tuple[str, Path]], cycles: list[str]) -> str:
    lines = [row("variant", "val BPB after pretraining", "connections moved in pretraining"), row(*["---"] * 3)]
    for label, root in variants:
        p = load(root / "pretrain.json")
        moved = (p or {}).get("topology", {}).get("moved")  # written only for sparse experts
        bpb = "missing" if p is None else ", ".join(f"{d} {v:.3f}" for d, v in sorted(p["val_bpb"].items()))
        lines.append(row(label, bpb, "–" if moved is None else f"{moved:,}"))
    lines += ["", row("variant", "cycle (new domain)", "avg forgetting", "worst forgetting", "absorption (BPB)",
                      "new-domain BPB after", "routing stability"), row(*["---"] * 7)]
    for label, root in variants:
        seen = []
        for cycle in cycles:
            m = load(root / "eval" / f"{cycle}.json")
            if m is None:
                lines.append(row(label, cycle, "missing", *["–"] * 4))
                continue
            seen.append(m)
            worst = max(m["forgetting"], key=m["forgetting"].get)
            lines.append(row(label, f"{cycle} ({m['domain']})", pct(m["avg_forgetting"]),
                             f"{pct(m['worst_forgetting'])} ({worst})", f"{m['absorption']:.3f}",
                             f"{m['bpb'][m['domain']]:.3f}", stability(m["routing_stability_mean"])))
        if seen:
            stabs = [m["routing_stability_mean"] for m in seen if m["routing_stability_mean"] is not None]
            lines.append(row(label, f"**mean of {len(seen)}**", pct(mean([m["avg_forgetting"] for m in seen])),
                             pct(mean([m["worst_forgetting"] for m in seen])),
                             f"{mean([m['absorption'] for m in seen]):.3f}", "–", stability(mean(stabs))))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", action="append", default=[], help="NAME=DIRECTORY: copy a DVC experiment's metrics")
    ap.add_argument("--variant", action="append", required=True, help="LABEL=DIRECTORY (laid out like metrics/)")
    ap.add_argument("--params", default="params.yaml", help="its `cycles` section gives the cycle order")
    ap.add_argument("--out", default="docs/results.md")
    args = ap.parse_args()
    for item in args.export:
        name, dest = item.split("=", 1)
        export(name, Path(dest))
    variants = [(label, Path(d)) for label, d in (v.split("=", 1) for v in args.variant)]
    for label, root in variants:
        if not root.is_dir():
            raise SystemExit(f"error: {root}: metrics directory of variant {label!r} not found")
    cycles = list(load_section(args.params, "cycles"))
    replace_section(args.out, "density", tables(variants, cycles))


if __name__ == "__main__":
    main()
