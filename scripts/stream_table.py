"""The streaming scenario's table (issue 32): per drop, what novelty decided and what it cost.

Reads a finished run of ``presets/stream.yaml`` — the workspace, a DVC experiment or a directory of
its exported metrics (``docs/runs/stream``) — and writes, per cycle: the decision (grow a path, or
consolidate the paths that explain the drop, with their record counts), the paths after it, the
domain's validation BPB before and after (absorption), average and worst forgetting over the other
domains, and what the model then spends per token at inference. The table replaces the text between
``<!-- stream:start -->`` and ``<!-- stream:end -->`` of ``--out``:

    python -m scripts.stream_table --run docs/runs/stream --out docs/results.md
"""

from __future__ import annotations

import argparse

from hst.io import replace_section
from hst.runs import pct, read_metrics, variant_params


def decision(growth: dict | None) -> str:
    if growth is None:
        return "grow (always)"
    parts = [f"consolidate path {p} ({c['new_records']} new + {c['old_records']} stored)"
             for p, c in growth["consolidated"].items()]
    if growth["grown_path"] is not None:
        parts.append(f"grow path {growth['grown_path']} ({growth['grow_records']} records)")
    if growth["left_records"]:
        parts.append(f"{growth['left_records']} left")
    return "; ".join(parts) or "nothing"


def table(run: str) -> str:
    cycles = variant_params(run)["cycles"]
    lines = ["| drop | domain | decision | paths | BPB before → after | avg forgetting | worst forgetting "
             "| inference MFLOPs per token | parameters |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    seen: set[str] = set()
    for cycle, item in cycles.items():
        m = read_metrics(run, f"metrics/eval/{cycle}.json")
        d, cost = m["domain"], m["inference"]
        worst = max(m["forgetting"], key=m["forgetting"].get)
        lines.append(f"| {cycle} | {d}{' (repeat)' if d in seen else ''} | {decision(m.get('growth'))} | "
                     f"{cost['paths']} | {m['bpb_before'][d]:.3f} → {m['bpb'][d]:.3f} | {pct(m['avg_forgetting'])} | "
                     f"{pct(m['worst_forgetting'])} ({worst}) | {cost['mflops_per_token']:.1f} | "
                     f"{cost['parameters'] / 1e6:.1f} M |")
        seen.add(d)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="docs/runs/stream", help="workspace, exp:NAME or a directory of exported metrics")
    ap.add_argument("--out", default="docs/results.md")
    args = ap.parse_args()
    replace_section(args.out, "stream", table(args.run))


if __name__ == "__main__":
    main()
