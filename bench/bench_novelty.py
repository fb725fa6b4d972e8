"""The growth detector on the default scenario: AUROC, false expert creation, records until detection.

For every cycle in params.yaml, with the checkpoint the cycle starts from (``models/<prev>.champion.pt``, as
`build_index` and `collect` use):
  - scores records of the learned domains' validation splits (held-in) and of the cycle's incoming
    domain (new) by surprise (record BPB, the product's score) and, per layer, by the seed's raw
    score (1 − mean best-key cosine) for comparison, and reports AUROC new vs. held-in;
  - sets the threshold as ``grow.quantile`` of the cycle's index BPB (``indexes/<prev>.parquet``,
    what `grow` uses) and reports the share of held-in and new records above it;
  - simulates ``--streams`` random streams: ``--held-in`` held-in records, then records that are new
    with probability ``--mix``; a trigger (``grow`` params) inside the held-in part is a false
    expert creation; records-until-detection counts from the first record of the mixed part.
Run after `dvc repro`; writes a Markdown report:

    python bench/bench_novelty.py [--records 120] [--streams 200] --out docs/novelty.md
"""

from __future__ import annotations

import argparse
import random
import statistics

import torch

from hst import checkpoint, data, novelty, sampler
from hst.config import GrowConfig
from hst.io import write_text
from hst.params import load_section, read_params


def scores(model, texts: list[str], desc: str) -> tuple[list[float], list[list[float]]]:
    """Per record: surprise (BPB) and per-layer raw novelty (1 − mean best-key cosine)."""
    routed = sampler.route_records(model, texts, desc=desc)
    return ([r.bpb for r in routed],
            [[1 - float(r.max_sim.mean()) for r in rec.routing if r is not None] for rec in routed])


def simulate(held: list[float], new: list[float], limit: float, cfg: GrowConfig, n_held: int, mix: float,
             streams: int, seed: int) -> tuple[float, list[int]]:
    rng = random.Random(seed)
    false, delays = 0, []
    for _ in range(streams):
        stream = [rng.choice(held) for _ in range(n_held)]
        stream += [rng.choice(new) if rng.random() < mix else rng.choice(held) for _ in range(len(new))]
        until = novelty.detect(stream, limit, cfg).records_until_detection  # the `learn` stage's own decision
        if until is not None and until <= n_held:
            false += 1
        elif until is not None:
            delays.append(until - n_held)
    return false / streams, delays


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--prepared", default="data/prepared")
    ap.add_argument("--records", type=int, default=120, help="records scored per domain")
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--held-in", type=int, default=96, help="held-in records before the new domain starts")
    ap.add_argument("--mix", type=float, default=0.75, help="share of new records once the new domain starts")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    params = read_params(args.params)
    cfg = load_section(args.params, "grow", GrowConfig)
    lines = ["| cycle (new domain) | AUROC surprise | AUROC raw cosine, layers 0–3 | threshold (BPB) | held-in val above | new above | false expert creation | records until detection (median, max) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, cycle in params["cycles"].items():
        model, meta = checkpoint.load(f"models/{cycle['prev']}.champion.pt")  # what build_index and collect used
        held_bpb, held_raw = [], []
        for d in meta["learned_domains"]:
            b, r = scores(model, data.sample_records(data.load_records(args.prepared, d, "val"), args.records, "bench"), f"{name} {d}")
            held_bpb += b
            held_raw += r
        new_bpb, new_raw = scores(model, data.sample_records(data.load_records(args.prepared, cycle["domain"], "train"),
                                                             args.records, "bench"), f"{name} {cycle['domain']}")
        ref = sampler.read_buffer(f"indexes/{cycle['prev']}.parquet", columns=["bpb"])["bpb"].to_pylist()
        limit = novelty.threshold(ref, cfg.quantile)
        raw_auc = [novelty.auroc([h[l] for h in held_raw], [n[l] for n in new_raw]) for l in range(len(held_raw[0]))]
        false, delays = simulate(held_bpb, new_bpb, limit, cfg, args.held_in, args.mix, args.streams, seed=0)
        detect = (f"{statistics.median(delays):.0f}, {max(delays)} ({len(delays)}/{args.streams} streams)"
                  if delays else f"never (0/{args.streams} streams)")
        lines.append(f"| {name} ({cycle['domain']}) | {novelty.auroc(held_bpb, new_bpb):.3f} | "
                     f"{' / '.join(f'{a:.2f}' for a in raw_auc)} | {limit:.3f} | "
                     f"{sum(b > limit for b in held_bpb) / len(held_bpb):.1%} | {sum(b > limit for b in new_bpb) / len(new_bpb):.1%} | "
                     f"{false:.1%} | {detect} |")
    header = (f"Novelty detector on the default scenario (`python bench/bench_novelty.py`): {args.records} records per "
              f"domain; streams of {args.held_in} held-in records, then {args.mix:.0%} new; trigger = "
              f"{cfg.min_batches} consecutive batches of {cfg.batch_records} records with > {cfg.novel_share:.0%} above "
              f"the {cfg.quantile} quantile of the cycle's index BPB.\n\n")
    report = header + "\n".join(lines) + "\n"
    print(report)
    if args.out:
        write_text(args.out, report)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
