"""DVC stage `prepare`: cut every domain into records and write deterministic train/val/test splits.

Writes ``<out>/<domain>/{train,val,test}.parquet`` (columns ``record_id``, ``text``) and a manifest
of records and bytes per domain and split.
"""

from __future__ import annotations

import argparse

from tqdm import tqdm

from hst import data
from hst.config import PrepareConfig, build, load_params
from hst.io import atomic_path, write_json
from stages.common import run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", required=True, help="directory of prepared splits")
    ap.add_argument("--manifest", required=True, help="JSON manifest (a DVC metric)")
    args = ap.parse_args()

    (section,) = load_params(args.params, "prepare")
    cfg = build(PrepareConfig, section, "params.yaml:prepare")
    # Read and split everything before writing anything: a bad file leaves old outputs intact.
    with tqdm(cfg.domains.items(), desc="prepare") as bar:  # closes the bar cleanly on error
        splits = {name: data.split_domain(path, cfg) for name, path in bar}
    with atomic_path(args.out) as tmp:
        for name, recs in splits.items():
            for split, records in recs.items():
                data.write_split(data.split_path(tmp, name, split), records)
    write_json(args.manifest, {name: data.manifest_entry(recs) for name, recs in splits.items()})


if __name__ == "__main__":
    run(main)
