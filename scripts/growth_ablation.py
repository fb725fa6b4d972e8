"""What growth costs and gains on one cycle, against spending the same steps on more consolidation.

Starts every variant from the model the cycle's growth starts from (its start champion after the
consolidation its mode runs, ``hst.cycle.consolidate``) and reports BPB change on each learned
domain's validation split and on the new domain:

    python scripts/growth_ablation.py --cycle c3_german --variant grow:0.001:160 \
        --variant grow:0.003:160 --variant consolidate:160

``grow:FPR:STEPS`` grows ``grow.experts`` experts per layer behind a learned gate (``grow.select:
gate``, false-positive rate FPR; the workspace must have run with gates: a model that grew paths
refuses them) trained STEPS
steps on the cycle's incoming records; ``consolidate:STEPS`` instead consolidates the experts the cycle's
records route to (mode ``experts``' coresets) for STEPS more steps. Other settings come from params.yaml (`grow`, `consolidate`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses


from hst import checkpoint, coreset, cycle, data, evaluation, gates, sampler
from hst.config import CycleConfig, GrowConfig, TrainConfig
from hst.consolidate import consolidate_experts
from hst.params import load_section, read_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cycle", required=True)
    ap.add_argument("--variant", action="append", required=True)
    ap.add_argument("--windows", type=int, default=32)
    args = ap.parse_args()
    params = read_params("params.yaml")
    gcfg = load_section("params.yaml", "grow", GrowConfig)
    tcfg = load_section("params.yaml", "consolidate", TrainConfig)
    ccfg = load_section("params.yaml", "cycle", CycleConfig)
    domain, prev = params["cycles"][args.cycle]["domain"], params["cycles"][args.cycle]["prev"]
    start, meta = checkpoint.load(f"models/{prev}.champion.pt")
    buf = sampler.load_records(f"cycles/{args.cycle}/buffer")
    index = sampler.read_buffer(f"indexes/{prev}.parquet")
    cycle.consolidate(start, buf, index, ccfg, tcfg)
    val = {d: data.load_tokens("data/prepared", d, "val") for d in [*meta["learned_domains"], domain]}
    base = evaluation.evaluate_domains(start, val, args.windows)
    held_in = sampler.tokens_by_source(index)
    print(f"| variant | {' | '.join(val)} |\n| --- |{' --- |' * len(val)}")
    for variant in args.variant:
        kind, *rest = variant.split(":")
        model = copy.deepcopy(start)
        if kind == "grow":
            cfg = dataclasses.replace(gcfg, select="gate", gate_fpr=float(rest[0]), steps=int(rest[1]))
            gates.grow(model, list(range(model.cfg.n_layer)), data.encode(buf["text"].to_pylist()),
                       held_in, cfg, tcfg)
        else:
            _, sets = coreset.sets("experts", buf, index, ccfg.min_new_data, ccfg.new_old_ratio, ccfg.seed)
            consolidate_experts(model, sets, dataclasses.replace(tcfg, steps=int(rest[0])))
        after = evaluation.evaluate_domains(model, val, args.windows)
        print(f"| {variant} | " + " | ".join(f"{100 * (after[d].bpb / base[d].bpb - 1):+.2f} %" for d in val) + " |",
              flush=True)


if __name__ == "__main__":
    main()
