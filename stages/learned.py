"""DVC stages `learned_pretrain@<domain>` and `learned@<cycle>`: the domains a cycle knows, as one directory.

A cycle reads its new domain and every domain learned before it. Giving each cycle a directory of
exactly those domains (the previous cycle's plus its own, copied from ``prepare``) lets DVC see
what a cycle reads: appending a cycle with a new domain leaves every earlier directory, and so every
earlier stage, unchanged. With ``--base`` the output is replaced whole (base's domains plus
``--domain``); without it only ``<out>/<domain>`` is written, so one stage per pretraining domain
fills ``data/learned/pretrain`` side by side.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hst import data
from hst.io import atomic_path
from stages.common import run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base", help="the previous cycle's directory (its domains are copied too)")
    ap.add_argument("--domain", required=True, help="a prepared domain directory (data/prepared/<domain>)")
    ap.add_argument("--out", required=True, help="directory of domain directories")
    args = ap.parse_args()

    domain = Path(args.domain)
    if not args.base:
        with atomic_path(Path(args.out) / domain.name) as tmp:
            data.copy_domain(domain, tmp)
        return
    # A domain learned again (a later cycle of the same domain) is copied once, from prepare.
    sources = [Path(args.base) / d for d in data.prepared_domains(args.base) if d != domain.name] + [domain]
    with atomic_path(args.out) as tmp:
        for src in sources:
            data.copy_domain(src, tmp / src.name)


if __name__ == "__main__":
    run(main)
