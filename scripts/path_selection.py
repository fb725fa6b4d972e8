"""How a model's paths serve text: validation BPB per domain under the flat-cost selection, the
mixture of every path and each single path, and on sequences that change domain half-way.

    python -m scripts.path_selection models/c4_gcide.champion.pt [--windows 32] [--out docs/runs/path_selection.json]

Per domain: the BPB of every path alone (the best one is the oracle a perfect per-domain choice
would reach), of the mixture (``grow.inference: mixture``, P models per token), and of the
selection (``select``, :mod:`hst.paths`) with the model passes it spent, and of the selection
mixed with path 0 by their posterior (``select_base``: at most one more pass per token, still flat in
the number of paths). Switches: windows whose
first half is one domain's validation text and second half another's (every ordered pair), the
same three ways; the best single path there is the better of the two domains' best paths.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F

from hst import checkpoint, data, paths
from hst.evaluation import LN2, eval_mode, eval_windows
from hst.io import write_json
from hst.model import ALL_PATHS, SELECTED_AND_BASE, SELECTED_PATHS

# The name the results carry for grow.inference: select_base (kept from before it was built in GPT.forward).
WITH_PATH_0 = "select + path 0"


@torch.no_grad()
def bpb(model, windows: torch.Tensor, mode: int) -> float:
    """Mean bits per byte of (W, T + 1) windows under ``GPT.forward(..., path=mode)``."""
    nll = []
    with eval_mode(model):
        for w in windows.split(16):  # a mixture's logits are log-probabilities: cross-entropy takes both
            nll.append(F.cross_entropy(model(w[:, :-1], path=mode).logits.transpose(1, 2), w[:, 1:]))
    return float(torch.stack(nll).mean()) / LN2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--prepared", default="data/prepared")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    model, meta = checkpoint.load(args.checkpoint)
    T = model.cfg.seq_len
    domains = list(meta["learned_domains"])
    val = {d: eval_windows(data.load_tokens(args.prepared, d, "val"), T, args.windows) for d in domains}
    modes = {"select": SELECTED_PATHS, WITH_PATH_0: SELECTED_AND_BASE, "mixture": ALL_PATHS,
             **{f"path {p}": p for p in range(model.n_paths)}}
    rows = {}
    for d in domains:
        rows[d] = {name: bpb(model, val[d], mode) for name, mode in modes.items()}
        for name, mode in (("select", SELECTED_PATHS), (WITH_PATH_0, SELECTED_AND_BASE)):
            with torch.no_grad():
                rows[d][f"{name} passes"] = model(val[d][:, :-1], path=mode).passes
        print(d, {k: round(v, 3) for k, v in rows[d].items()}, flush=True)
    best = {d: min(range(model.n_paths), key=lambda p: rows[d][f"path {p}"]) for d in domains}
    switches = {}
    for a, b in itertools.permutations(domains, 2):
        half = T // 2 + 1
        w = torch.cat([val[a][:, :half], val[b][:, half - 1:-1]], 1)[:, :T + 1]
        r = {name: bpb(model, w, modes[name]) for name in ("select", WITH_PATH_0, "mixture")}
        r["best single path"] = min(bpb(model, w, p) for p in {best[a], best[b]})
        switches[f"{a} -> {b}"] = r
        print(a, "->", b, {k: round(v, 3) for k, v in r.items()}, flush=True)
    mean = lambda table, key: sum(r[key] for r in table.values()) / len(table)  # noqa: E731
    summary = {"domains": {k: mean(rows, k) for k in ("select", WITH_PATH_0, "mixture", "select passes",
                                                      f"{WITH_PATH_0} passes")}
               | {"best path per domain": sum(rows[d][f"path {best[d]}"] for d in domains) / len(domains)},
               "switches": {k: mean(switches, k) for k in ("select", WITH_PATH_0, "mixture", "best single path")}}
    print(json.dumps(summary, indent=1))
    if args.out:
        write_json(args.out, {"checkpoint": args.checkpoint, "paths": model.n_paths, "decisions": list(paths.DECISIONS),
                              "per_domain": rows, "switches": switches, "summary": summary})


if __name__ == "__main__":
    main()
