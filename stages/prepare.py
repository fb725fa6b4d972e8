"""DVC stage `prepare@<domain>`: cut one domain's source into records and write deterministic splits.

Writes ``<out>/{train,val,test}.parquet`` (columns ``record_id``, ``text``) and a manifest of
records and bytes per split. One stage per domain, so adding a domain prepares only that domain and
leaves every stage that reads the others up to date.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hst import data
from hst.config import ConfigError, PrepareConfig
from hst.io import atomic_path, write_json
from hst.params import load_section
from stages.common import run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--domain", required=True, help="a key of params.yaml:prepare.domains")
    ap.add_argument("--out", required=True, help="directory of the domain's splits")
    ap.add_argument("--manifest", required=True, help="JSON manifest (a DVC metric)")
    args = ap.parse_args()

    cfg = load_section(args.params, "prepare", PrepareConfig)
    if args.domain not in cfg.domains:
        raise ConfigError(f"params.yaml:prepare.domains: expected a key {args.domain!r}, got {sorted(cfg.domains)}")
    # Read and split before writing anything: a bad file leaves the old splits intact.
    splits = data.split_domain(cfg.domains[args.domain], cfg)
    with atomic_path(args.out) as tmp:
        for split, records in splits.items():
            data.write_split(Path(tmp) / f"{split}.parquet", records)
    write_json(args.manifest, data.manifest_entry(splits))


if __name__ == "__main__":
    run(main)
