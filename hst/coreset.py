"""Per-expert coresets (seed §5.2): an expert's new records mixed with old data routed to it.

Both inputs are Smart Sampler tables (``hst.sampler.SCHEMA``): the new records of a cycle and the
index of old training records routed through the current model (seed §11.5). An expert is a
(layer, expert id) pair; a record belongs to it when that expert is its primary one at that layer.
:func:`sets` builds a cycle's training sets as its mode asks.
"""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

from hst.data import encode


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


def sets(kind: str, new: pa.Table, old: pa.Table, min_new_data: int, new_old_ratio: float,
         seed: int = 0) -> tuple[list[dict], list[tuple]]:
    """The training sets of a cycle's consolidation, in training order: per set its entry (name, layer,
    expert, new and old record counts) and what training reads. ``kind`` "experts": per (layer, expert)
    primary for at least ``min_new_data`` new records, its new records plus old ones routed to it at
    ``new_old_ratio`` -> ``(layer, expert, coreset tokens, the expert's new tokens)``; "new": all new
    records; "replay": all new plus a sample of ``old`` at ``new_old_ratio`` -> ``(None, None, tokens,
    None)``; "none": no set."""
    if kind == "none":
        return [], []
    if kind != "experts":
        df = mix(new, old, new_old_ratio if kind == "replay" else 1.0, seed)
        return [_entry("all", None, None, df)], [(None, None, encode(df["text"].tolist()), None)]
    texts, primaries = new["text"].to_pylist(), new["primary_expert"].to_pylist()
    entries, out = [], []
    for layer, expert, _ in select_experts(new, len(primaries[0]), min_new_data):
        df = build_coreset(new, old, layer, expert, new_old_ratio, seed)
        entries.append(_entry(f"L{layer}_E{expert}", layer, expert, df))
        out.append((layer, expert, encode(df["text"].tolist()),
                    encode([t for t, p in zip(texts, primaries) if p[layer] == expert])))
    return entries, out


def _entry(name: str, layer: int | None, expert: int | None, df: pd.DataFrame) -> dict:
    return {"name": name, "layer": layer, "expert": expert,
            "new": int((df.kind == "new").sum()), "old": int((df.kind == "old").sum())}
