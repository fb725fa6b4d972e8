"""The stability–plasticity front: HST and dense + replay at several per-cycle training budgets.

    python -m scripts.pareto --run      # every (method, budget) not yet exported, as a DVC experiment
    python -m scripts.pareto --run --methods "HST, paths selected" --runs docs/runs/pareto_2threads  # one method
    python -m scripts.pareto --export   # export experiments that ran elsewhere (same names)
    python -m scripts.pareto            # rebuild docs/pareto.png and the table in docs/results.md
    python -m scripts.pareto --runs DIR --section NAME --figure F   # the same for another set of points

Every point is the default scenario (the cycles of params.yaml) run as a DVC experiment in the
workspace (`dvc exp run -n pareto-<method>-<budget>x`; points with the same pretraining settings
pretrain once, ``hst.runs.run_experiments``), with
the method's settings and a training budget per cycle of ``budget`` × 160 steps (the default; 8 × 256
tokens a step). HST spends it on its new experts (``grow.steps``; a path of their own by default,
behind learned gates in the "gates" points), dense + replay on finetuning
everything on 1 new : 4 old records (``consolidate.steps``). Each experiment's params and metrics are
exported to ``--runs``/<method>_<budget>x and committed, so the figure and table rebuild in a fresh
clone. The cycles a point runs are logged into the project's MLflow store as variant
``pareto-<method>-<budget>x`` (docs/mlflow.md; a point equal to the workspace runs nothing). After
``--run`` the workspace is back at the committed pipeline (``git checkout`` of params, lock,
metrics and plots, then ``dvc checkout``): commit your own changes first, and commit nothing
while it runs (a workspace experiment detaches HEAD at its baseline and moves the branch back
afterwards, so a commit made meanwhile is left off the branch). To run points side by side, clone
the repository, point it at the same cache (``dvc cache dir``), ``dvc checkout`` and run there.

Per point and cycle: absorption (BPB gained on the new domain) and average forgetting of the old
domains; per point: worst forgetting, mean BPB over all domains after the last cycle, training tokens
and FLOPs per cycle (3 × forward FLOPs per token, `GPT.flops_per_token`), and the **plasticity ratio**
P = mean over cycles of absorption ÷ the absorption of dense full finetuning at 1× (the
``dense finetune`` point) in the same cycle.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from hst.io import atomic_path, replace_section  # noqa: E402
from hst.model import GPT  # noqa: E402
from hst.params import load_section  # noqa: E402
from hst.runs import (BENCH, OPEN_GATE, REPLAY_POOL, SPEED_NOTE, export, forward_speed, git,  # noqa: E402
                      inference_cost, model_of, pct, read_metrics, run_experiments, speed, variant_params)

BASE_STEPS = 160
BRANCHES = [f"cycles.{c}.prev=pretrain" for c in ("c2_manpages", "c3_german", "c4_gcide")]
# Points run before gates tightened to a forgetting budget: their gates keep grow.gate_fpr.
FIXED_RATE = ["grow.forgetting_budget=0"]
# label -> (slug, params key holding the cycle's training steps, overrides, budgets as multiples of BASE_STEPS)
# Learned gates (the default before 2026-12-01's paths) with the index they were calibrated on.
GATES = ["grow.select=gate", "cycle.index_records=150"]
METHODS = {
    # The default since late 2026-12-07: growth paths with an output head each (hst/heads.py), one selected per segment
    # by the paths' byte sketches (hst/paths.py) and mixed with path 0 by their posterior; flat in the paths (issue 32).
    "HST, paths selected + path 0, own heads (default)": ("hst-paths-heads", "grow.steps",
                                                          ["grow.inference=select_base", "grow.head=path"], (1,)),
    # The paths below share path 0's output head (grow.head: shared, the only head until late 2026-12-07).
    # The default earlier on 2026-12-07.
    "HST, paths selected + path 0": ("hst-paths-select-base", "grow.steps",
                                     ["grow.inference=select_base", "grow.head=shared"], (1,)),
    # Every path mixed by its posterior: one model per path (the default from 2026-12-01 to 2026-12-07).
    "HST, paths mixed": ("hst-paths", "grow.steps", ["grow.inference=mixture", "grow.head=shared"], (1,)),
    "HST, replay-free": ("hst-paths-replay-free", "grow.steps",
                         ["cycle.replay=generated", "grow.inference=mixture", "grow.head=shared"], (1,)),
    # The selected path alone: ~1.1 passes per token, but a misrouted window has no fallback.
    "HST, paths selected": ("hst-paths-select", "grow.steps", ["grow.inference=select", "grow.head=shared"], (1,)),
    "HST, gates, budget 1.5 %": ("hst-budget1.5", "grow.steps", [*GATES], (1,)),  # the default before paths
    "HST, gates, budget 2 %": ("hst-budget2", "grow.steps", [*GATES, "grow.forgetting_budget=0.02"], (1,)),
    "HST, gates, budget 1 %": ("hst-budget1", "grow.steps", [*GATES, "grow.forgetting_budget=0.01"], (1,)),
    "HST, gates, replay-free": ("hst-replay-free-budget2", "grow.steps",
                                [*GATES, "cycle.replay=generated", "grow.forgetting_budget=0.02"], (1,)),
    # Fixed gate rates (no forgetting budget): 1 % was the default before 2026-11-30's second change.
    "HST, gate 1 %": ("hst-gate1", "grow.steps", [*GATES, "grow.gate_fpr=0.01", *FIXED_RATE], (0.5, 1, 2)),
    "HST, gate 5 %": ("hst-gate5", "grow.steps", [*GATES, "grow.gate_fpr=0.05", *FIXED_RATE], (1,)),
    # The linear (Fisher) gate's points, run before MLP gates and the index defaults of 2026-11-30.
    "HST, linear gate 3 %": ("hst", "grow.steps", [*GATES, "grow.gate_fpr=0.03", "grow.gate_hidden=0", *FIXED_RATE],
                             (0.5, 1, 2)),
    "HST, replay-free, gate 0.5 %": ("hst-replay-free-gate0.5", "grow.steps",
                                     [*GATES, "cycle.replay=generated", "grow.gate_fpr=0.005", *FIXED_RATE], (1,)),
    "HST, replay-free, linear gate 3 %": ("hst-replay-free", "grow.steps",
                                          [*GATES, "cycle.replay=generated", "grow.gate_fpr=0.03", "grow.gate_hidden=0",
                                           *FIXED_RATE], (1,)),
    "dense + replay": ("dense-replay", "consolidate.steps",
                       ["model.ffn=dense", "cycle.mode=full_replay", *REPLAY_POOL, *OPEN_GATE], (0.5, 1, 2)),
    # Tuning the baseline (issue 31): its learning rate and its new-data share (1:4 -> 1:1).
    **{f"dense + replay, {share}lr {lr:g}": (f"dense-replay-{slug}lr{lr:g}", "consolidate.steps",
                                              ["model.ffn=dense", "cycle.mode=full_replay", *REPLAY_POOL, *OPEN_GATE,
                                               f"consolidate.lr={lr:g}", *ratio], (1,))
       for share, slug, ratio in (("", "", []), ("50 % new, ", "new50-", ["cycle.new_old_ratio=0.5"]))
       for lr in (0.0005, 0.001, 0.002) if share or lr != 0.0005},
    # Branch-train-mix's branches (issue 31): every cycle finetunes the dense pretraining on its domain
    # (not the previous cycle's model); scripts/btm.py mixes the branches (posterior) or picks one (top-1).
    "dense branches, each alone": ("dense-branches", "consolidate.steps",
                       ["model.ffn=dense", "cycle.mode=full", *OPEN_GATE, *BRANCHES], (1,)),
    # P's denominator; in the table, not in the figure (it forgets tens of percent).
    "dense finetune": ("dense-finetune", "consolidate.steps", ["model.ffn=dense", "cycle.mode=full", *OPEN_GATE], (1,)),
}
REFERENCE = "dense finetune"


def points() -> list[tuple[str, float, str, list[str]]]:
    """``(label, budget, experiment name, -S overrides)`` of every point on the front."""
    return [(label, b, f"pareto-{slug}-{b:g}x", [*overrides, f"{key}={round(b * BASE_STEPS)}"])
            for label, (slug, key, overrides, budgets) in METHODS.items() for b in budgets]


def experiments() -> set[str]:
    """Names of the DVC experiments of this repository."""
    return {r.rsplit("/", 1)[-1] for r in git("for-each-ref", "--format=%(refname)", "refs/exps").split()}


def run_dir(runs: Path, name: str) -> Path:
    return runs / name.removeprefix("pareto-").replace("-", "_")


def summarize(source: str, reference: str | None, cycles: list[str], bench: dict) -> dict:
    """One point's numbers (see the module docstring) from its exported params and metrics."""
    params = variant_params(source)
    reports = [read_metrics(source, f"metrics/eval/{c}.json") for c in cycles]
    dense = [read_metrics(reference, f"metrics/eval/{c}.json")["absorption"] for c in cycles] if reference else None
    steps = params["grow"]["steps"] if params["cycle"]["mode"] == "grow" else params["consolidate"]["steps"]
    tokens = steps * params["consolidate"]["batch_size"] * params["model"]["seq_len"]
    model = model_of(source, reports[-1]["experts_per_layer"])
    cost = inference_cost(source, reports[-1])
    worst = max((r["forgetting"][d], d, r["name"]) for r in reports for d in r["forgetting"])
    # New text's share of the training tokens: growth trains on the cycle's records alone unless a known
    # path consolidated (then on its coreset, as replay and expert consolidation do); full finetuning too.
    mixed = params["cycle"]["mode"] in ("full_replay", "experts") or any(
        (r.get("growth") or {}).get("consolidated") for r in reports)
    return {"absorption": [r["absorption"] for r in reports],
            "forgetting": [r["avg_forgetting"] for r in reports],
            "worst": worst,
            "promoted": sum(read_metrics(source, f"metrics/gate/{c}.json")["passed"] for c in cycles),
            "final_bpb": sum(reports[-1]["bpb"].values()) / len(reports[-1]["bpb"]),
            "tokens": tokens, "flops": 3 * model.flops_per_token() * tokens,
            "new_share": params["cycle"]["new_old_ratio"] if mixed else 1.0,
            "old_records": sum(old_records(source, c) for c in cycles) / len(cycles),
            "parameters": cost["parameters"],
            # over the pretrained model's shape, per cycle
            "added_per_cycle": (cost["parameters"] - sum(p.numel() for p in GPT(model.cfg).parameters())) / len(cycles),
            "inference_mflops": cost["mflops_per_token"],
            "speed": forward_speed(source, cycles[-1], bench),
            "P": None if dense is None else sum(r["absorption"] / d for r, d in zip(reports, dense)) / len(cycles)}


def old_records(source: str, cycle: str) -> int:
    """Old (stored) records a cycle trained on: replay's and the experts' coresets, a known path's
    consolidation, and growth's old share (counted per coreset, so a record two coresets hold counts twice)."""
    sets = read_metrics(source, f"metrics/cycles/{cycle}/consolidate.json").get("sets", [])
    grow = read_metrics(source, f"metrics/cycles/{cycle}/grow.json")
    known = ((grow.get("decision") or {}).get("consolidated") or {}).values()
    return sum(s.get("old", 0) for s in sets) + grow.get("old_records", 0) + sum(k["old_records"] for k in known)


def table(rows: list[tuple[str, float, dict]], cycles: list[str], reference: str | None) -> str:
    lines = ["| method | budget | absorption per cycle (BPB) | avg forgetting per cycle | worst forgetting "
             "| final mean BPB, all domains | P | cycles promoted | training tokens per cycle | training TFLOPs per cycle "
             "| new-text share | old records trained on per cycle | inference MFLOPs per token, last model "
             "| forward tokens/s ÷ dense (bench) | parameters, last model | added per cycle |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, budget, s in rows:
        lines.append(f"| {label} | {budget:g}× | {' / '.join(f'{a:.3f}' for a in s['absorption'])} "
                     f"| {' / '.join(pct(f) for f in s['forgetting'])} | {pct(s['worst'][0])} ({s['worst'][1]}, {s['worst'][2]}) "
                     f"| {s['final_bpb']:.3f} | {'–' if s['P'] is None else format(s['P'], '.2f')} | {s['promoted']}/{len(cycles)} | {s['tokens']:,} | {s['flops'] / 1e12:.2f} "
                     f"| {100 * s['new_share']:.0f} % | {s['old_records']:,.0f} | {s['inference_mflops']:.1f} | {speed(s['speed'])} "
                     f"| {s['parameters'] / 1e6:.1f} M "
                     f"| {s['added_per_cycle'] / 1e6:.2f} M |")
    lines += ["", f"Cycles: {', '.join(cycles)}. Budget: multiples of {BASE_STEPS} steps × 8 × 256 tokens per cycle. "
                  + (f"P = mean over cycles of absorption ÷ dense full finetuning's at 1× (`{reference}`). " if reference
                     else "P needs a dense full finetuning run in the same folder (none here). ")
                  + "Dense runs keep the promotion gate open; HST runs keep the default gate (≤ 5 % forgetting on every old "
                  "domain), so a cycle that fails it is not the next cycle's start. Old records: stored records trained on, "
                  "summed over a cycle's coresets; HST also reads old text it does not train on: paths once, at the first "
                  "growth, for path 0's byte sketch; learned gates every cycle, to calibrate. " + SPEED_NOTE]
    return "\n".join(lines)


def figure(rows: list[tuple[str, float, dict]], cycles: list[str], out: str) -> None:
    """Per cycle, absorption (x) against average forgetting (y), one curve per method (budgets marked)."""
    fig, axes = plt.subplots(1, len(cycles), figsize=(4 * len(cycles), 3.6), squeeze=False)
    for i, (cycle, ax) in enumerate(zip(cycles, axes[0])):
        for label in (m for m in METHODS if m != REFERENCE):
            pts = [(s["absorption"][i], 100 * s["forgetting"][i], b) for lab, b, s in rows if lab == label]  # budget order
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
            for x, y, b in pts:
                ax.annotate(f"{b:g}×", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set(title=cycle, xlabel="absorption (BPB)", ylabel="avg forgetting (%)" if i == 0 else None)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--run", action="store_true", help="run every point not yet in --runs as a DVC experiment")
    mode.add_argument("--export", action="store_true", help="export those points that exist as DVC experiments here")
    ap.add_argument("--runs", type=Path, default=Path("docs/runs/pareto"))
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                    help="with --run: only these methods' points (labels as in METHODS)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="docs/results.md")
    ap.add_argument("--section", default="pareto", help="the table goes between <!-- SECTION:start/end --> of --out")
    ap.add_argument("--figure", default="docs/pareto.png")
    ap.add_argument("--bench", default=BENCH, help="the bench run forward speeds come from (bench/bench_paths.py --champion)")
    args = ap.parse_args()
    cycles = list(load_section(args.params, "cycles"))
    if args.run:
        todo = [(name, overrides) for label, _, name, overrides in points()
                if label in args.methods and not run_dir(args.runs, name).is_dir()]
        run_experiments(todo)
        for name, _ in todo:
            export(name, run_dir(args.runs, name))
    elif args.export:
        for name in sorted(experiments() & {name for _, _, name, _ in points()}):
            export(name, run_dir(args.runs, name))
    folder = run_dir(args.runs, "pareto-dense-finetune-1x")
    reference = str(folder) if folder.is_dir() else None
    bench = json.loads(Path(args.bench).read_text())
    rows = [(label, budget, summarize(str(run_dir(args.runs, name)), reference, cycles, bench))
            for label, budget, name, _ in points() if run_dir(args.runs, name).is_dir()]
    figure(rows, cycles, args.figure)
    replace_section(args.out, args.section, table(rows, cycles, reference))


if __name__ == "__main__":
    main()
