"""Per-expert coresets (seed §5.2): an expert's new records mixed with old data routed to it.

Both inputs are Smart Sampler tables (``hst.sampler.SCHEMA``): the new records of a cycle and the
index of old training records routed through the current model (seed §11.5). An expert is a
(layer, expert id) pair; a record belongs to it when that expert is its primary one at that layer.
This module owns the coreset folder's layout (:func:`write_sets`, :func:`read_sets`).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from hst.data import encode, read_parquet_column
from hst.io import read_json, write_json


def primary(table: pa.Table, layer: int) -> pd.Series:
    """Primary expert of every record at ``layer``."""
    return pd.Series([p[layer] for p in table["primary_expert"].to_pylist()], dtype="int64")


def select_experts(new: pa.Table, n_layers: int, min_new_data: int) -> list[tuple[int, int, int]]:
    """``(layer, expert, n_new)`` for every expert that is primary for ≥ ``min_new_data`` new records."""
    out = []
    for layer in range(n_layers):
        for expert, n in sorted(primary(new, layer).value_counts().items()):
            if n >= min_new_data:
                out.append((layer, int(expert), int(n)))
    return out


def build_coreset(new: pa.Table, old_index: pa.Table, layer: int, expert: int,
                  new_old_ratio: float = 0.2, seed: int = 0) -> pd.DataFrame:
    """New records of (layer, expert) plus old records routed to it, new:total = ``new_old_ratio``.

    Old records are sampled without replacement (seeded); if too few are routed to the expert, all
    of them are used and the shortfall shows in the result's ``kind`` counts. Columns:
    ``record_id``, ``source``, ``kind`` ("new"/"old"), ``text``.
    """
    return mix(new.filter(pa.array(primary(new, layer).to_numpy() == expert)),
               old_index.filter(pa.array(primary(old_index, layer).to_numpy() == expert)),
               new_old_ratio, seed)


def mix(new: pa.Table, old: pa.Table, new_old_ratio: float, seed: int = 0) -> pd.DataFrame:
    """All ``new`` records plus a seeded sample of ``old`` ones so that new:total = ``new_old_ratio``
    (all old ones if there are too few; none for a ratio of 1)."""
    if not 0 < new_old_ratio <= 1:
        raise ValueError(f"new_old_ratio: expected in (0, 1], got {new_old_ratio}")
    cols = ["record_id", "source", "text"]
    fresh, pool = new.select(cols).to_pandas(), old.select(cols).to_pandas()
    n_old = min(round(len(fresh) * (1 - new_old_ratio) / new_old_ratio), len(pool))
    picked = pool.sample(n=n_old, random_state=seed) if n_old else pool.iloc[:0]
    return pd.concat([fresh.assign(kind="new"), picked.assign(kind="old")], ignore_index=True)[
        ["record_id", "source", "kind", "text"]]


# The coreset folder a cycle's `coreset` stage writes: one Parquet per set, and selection.json
# listing the sets in training order with their (layer, expert) and new/old record counts.
SELECTION = "selection.json"

def write_sets(folder: Path, sets: dict[str, tuple[int | None, int | None, pd.DataFrame]]) -> None:
    """Write ``sets`` (name -> (layer, expert, coreset)) as a new coreset folder."""
    folder.mkdir()
    for name, (_, _, df) in sets.items():
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), folder / f"{name}.parquet")
    write_json(folder / SELECTION, [
        {"name": name, "layer": layer, "expert": expert,
         "new": int((df.kind == "new").sum()), "old": int((df.kind == "old").sum())}
        for name, (layer, expert, df) in sets.items()])


def read_sets(folder: str | Path, new: pa.Table, per_expert: bool) -> tuple[list[dict], list[tuple]]:
    """The selection entries of a coreset folder and, per entry, the set training reads:
    ``(layer, expert, coreset tokens, the expert's new tokens)`` with ``per_expert`` (its new records
    by primary expert), else ``(None, None, tokens, None)``."""
    folder = Path(folder)
    selection = read_json(folder / SELECTION, None)
    coresets = [encode(read_parquet_column(folder / f"{e['name']}.parquet", "text")) for e in selection]
    if not per_expert:
        return selection, [(None, None, tokens, None) for tokens in coresets]
    texts, primaries = new["text"].to_pylist(), new["primary_expert"].to_pylist()
    return selection, [(e["layer"], e["expert"], tokens,
                        encode([t for t, p in zip(texts, primaries) if p[e["layer"]] == e["expert"]]))
                       for e, tokens in zip(selection, coresets)]
