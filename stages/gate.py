"""DVC stage `gate`: decide whether the cycle's checkpoint becomes the champion.

Writes ``--out`` (the champion after this cycle: a byte copy of the cycle's checkpoint if it passes
``params.yaml:gate``, else of the previous champion) and ``--report`` (the decision, its reasons, the
alarms and the champion's name). The next cycle starts from ``--out``, so under `dvc repro` and in
the Prefect flow alike a rejected cycle is skipped over. Without ``--eval`` (pretraining) the
candidate is the first champion. The MLflow registry mirrors the decision in the `track` stage.
"""

from __future__ import annotations

import argparse
import shutil

from hst import checkpoint, promotion
from hst.config import GateConfig
from hst.io import ArtifactError, atomic_path, read_json, write_json
from hst.params import load_section
from stages.common import model_config, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--cycle", required=True, help="name of the candidate (a cycle key, or pretrain)")
    ap.add_argument("--candidate", required=True, help="the cycle's final checkpoint")
    ap.add_argument("--eval", help="the cycle's evaluation JSON; omitted for the first champion")
    ap.add_argument("--previous", help="the champion the cycle started from")
    ap.add_argument("--previous-report", help="gate report of the previous champion")
    ap.add_argument("--out", required=True, help="the champion after this cycle")
    ap.add_argument("--report", required=True, help="JSON: decision, reasons, alarms, champion name")
    args = ap.parse_args()
    if args.eval and not (args.previous and args.previous_report):
        ap.error("--eval needs --previous and --previous-report")

    cfg = load_section(args.params, "gate", GateConfig)
    if args.eval is None:
        decision = {"cycle": args.cycle, "passed": True, "reasons": [], "alarms": [],
                    "started_from": None, "champion": args.cycle}
    else:
        report = read_json(args.eval, ("forgetting",))
        if not isinstance(report["forgetting"], dict):
            raise ArtifactError(f"{args.eval}: forgetting: expected a mapping of domain -> number")
        previous = read_json(args.previous_report, ("champion",))["champion"]
        reasons = promotion.gate_failures(report, cfg)
        decision = {"cycle": args.cycle, "passed": not reasons, "reasons": reasons,
                    "alarms": promotion.alarms(report), "started_from": previous,
                    "champion": previous if reasons else args.cycle}
    champion = args.candidate if decision["champion"] == args.cycle else args.previous
    checkpoint.load(champion, model_config(args.params))  # never promote a file that is not a sound model
    with atomic_path(args.out) as tmp:
        shutil.copyfile(champion, tmp)
    write_json(args.report, decision)


if __name__ == "__main__":
    run(main)
