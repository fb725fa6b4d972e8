"""A drop that mixes domains (issue 32): records of several corpus domains in one source file, for a
cycle whose incoming text is not one domain — what an inbox that collects traffic receives.

Each domain's source (``prepare.domains``) is cut into records and split as ``prepare`` does; the drop
holds a sample of each domain's train records and all of its validation and test records, one record
per Parquet row (column ``text``), the domains alternating. A record keeps the split it has in its own
domain (the split is a hash of the record's text), so the drop's validation text was never trained on
under either name; the script checks this on the file it wrote.

    python -m scripts.mix_drop --domains german manpages --train 300 --out data/corpus/german_manpages.parquet
"""

from __future__ import annotations

import argparse
from collections import Counter
from itertools import chain, zip_longest

import pyarrow as pa
import pyarrow.parquet as pq

from hst import data
from hst.config import PrepareConfig
from hst.io import atomic_path
from hst.params import load_section


def mix(splits: list[dict[str, list[str]]], train: int, seed: str) -> list[str]:
    """Records of several domains' splits: ``train`` sampled train records and every val and test record of
    each, split by split, the domains alternating record by record."""
    out = []
    for split in data.SPLITS:
        parts = [data.sample_records(s[split], train, seed) if split == "train" else s[split] for s in splits]
        out += [r for r in chain.from_iterable(zip_longest(*parts)) if r is not None]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--domains", nargs="+", required=True, help="keys of prepare.domains")
    ap.add_argument("--train", type=int, default=300, help="train records per domain")
    ap.add_argument("--out", required=True, help="a .parquet file")
    args = ap.parse_args()
    cfg = load_section(args.params, "prepare", PrepareConfig)
    splits = [data.split_domain(cfg.domains[d], cfg) for d in args.domains]
    records = mix(splits, args.train, "mix_drop")
    with atomic_path(args.out) as tmp:
        pq.write_table(pa.table({"text": records}), tmp, compression="zstd")
    again = data.split_domain(args.out, cfg)  # as prepare will split the drop
    expected = {s: Counter(r for r in records if data.assign_split(r, cfg) == s) for s in data.SPLITS}
    if any(Counter(again[s]) != expected[s] for s in data.SPLITS):
        raise SystemExit(f"{args.out}: re-cut, its records do not keep their splits")
    print(f"{args.out}: {', '.join(f'{len(again[s])} {s}' for s in data.SPLITS)} records of {', '.join(args.domains)}")


if __name__ == "__main__":
    main()
