"""DVC stage `check_params`: validate the whole params file before anything runs.

DVC re-runs a stage only when a key it names changes, so a misspelt or unknown key (``cycle.lr`` for
``consolidate.lr``) would otherwise be ignored without a word. This stage depends on the whole
file, builds every section's config and checks the cycle chain; ``prepare`` (and so every stage)
depends on its output. The output lists the validated sections, so editing a value re-runs only
this check.
"""

from __future__ import annotations

import argparse

from hst.io import write_json
from hst.params import check_params, read_params
from stages.common import run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", required=True, help="JSON: the validated sections")
    args = ap.parse_args()
    built = check_params(read_params(args.params), args.params)
    write_json(args.out, {"valid": True, "sections": sorted(built)})


if __name__ == "__main__":
    run(main)
