"""The Smart Sampler (seed §5): logs text with its routing during inference, outside the model graph.

Each record is stored once, as one Parquet row:

| column | type | meaning |
| --- | --- | --- |
| ``record_id`` | string | content hash of ``text`` (stable across runs) |
| ``source`` | string | where the text came from (domain name or file) |
| ``seq`` | int64 | logical clock: how many records the log held when this one was routed (0, 1, 2, …) |
| ``text`` | string | the record itself |
| ``n_tokens`` | int32 | byte tokens routed |
| ``expert_counts`` | list<map<int32, int32>> | per layer ``{expert_id: token_count}`` over the k routed slots |
| ``primary_expert`` | list<int32> | per layer the expert with the most slots (ties: lowest id) |
| ``mean_max_sim`` | list<float32> | per layer mean best-key similarity |
| ``bpb`` | float32 | the model's surprise: bits per byte predicting the record (the novelty score) |

Buffers flush to ``<dir>/buffer-<n>.parquet`` atomically. A record whose id is already in the
directory is not logged again, so re-running collection over the same texts adds nothing.

Rows carry a logical clock, not wall time: a log is a DVC output, and a wall-clock column made its
hash differ on every run though nothing the model did had changed. ``seq`` keeps what a reader
needs from the time, the routing order (across buffer files and resumed collections), and is the
same whenever the same texts are served in the same order. A server that wants wall-clock times
keeps them in its own request log, outside the pipeline's outputs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from tqdm import tqdm

from hst import metrics
from hst.data import DataError, encode, record_id
from hst.evaluation import eval_mode
from hst.io import atomic_path
from hst.model import GPT
from hst.router import Routing

SCHEMA = pa.schema([
    ("record_id", pa.string()),
    ("source", pa.string()),
    ("seq", pa.int64()),
    ("text", pa.string()),
    ("n_tokens", pa.int32()),
    ("expert_counts", pa.list_(pa.map_(pa.int32(), pa.int32()))),
    ("primary_expert", pa.list_(pa.int32())),
    ("mean_max_sim", pa.list_(pa.float32())),
    ("bpb", pa.float32()),
])


def summarize(routing: list[Routing], n_experts: list[int]) -> dict:
    """Per-layer routing summary of one record's tokens (the routing of those tokens only)."""
    counts, primary, sim = [], [], []
    for r, n in zip(routing, n_experts):
        if r is None:  # dense FFN: nothing to log
            continue
        c = metrics.slot_counts(r.expert_ids, n)
        counts.append({int(e): int(c[e]) for e in c.nonzero().flatten()})
        primary.append(int(c.argmax()))  # argmax returns the first maximum: ties go to the lowest id
        sim.append(float(r.max_sim.mean()))
    return {"expert_counts": counts, "primary_expert": primary, "mean_max_sim": sim}


class Routed(NamedTuple):
    """One record routed through a model."""
    n_tokens: int  # byte tokens
    routing: list[Routing | None]  # per layer, the record's tokens in order
    bpb: float  # surprise: bits per byte of predicting every byte after the first from those before it in its window
    path: int  # the path that served most of its bytes (the most weighted one under the mixture)


@torch.no_grad()
def route_records(model: GPT, texts: list[str], batch_windows: int = 16, desc: str | None = None) -> list[Routed]:
    """Route each record's bytes through the model in consecutive windows of ``seq_len`` (a
    one-byte record has surprise 0).

    Windows of all records run ``batch_windows`` at a time (one window at a time ran the default
    model at half the tokens/s), padded at the end to the longest in the batch: attention is causal
    and the growth gates' running means look only backwards, so padding reaches no real position.
    ``desc`` labels a progress bar (none without it).
    """
    T = model.cfg.seq_len
    windows, sizes = [], []  # (record, bytes): each record's consecutive windows of T bytes + the next byte
    for i, text in enumerate(texts):
        tokens = encode([text]).long()
        if len(tokens) == 0:
            raise DataError("cannot route an empty record")
        windows += [(i, tokens[s:s + T + 1]) for s in range(0, len(tokens), T)]
        sizes.append(len(tokens))
    device = next(model.parameters()).device
    parts: list[list[list[Routing]]] = [[] for _ in texts]
    nll = [0.0] * len(texts)
    served = [torch.zeros(0, dtype=torch.long) for _ in texts]
    with eval_mode(model):
        for b in tqdm(range(0, len(windows), batch_windows), desc=desc, disable=desc is None, unit="batch"):
            batch = windows[b:b + batch_windows]
            width = max(min(len(w), T) for _, w in batch)
            x = torch.zeros(len(batch), width, dtype=torch.long)
            for row, (_, w) in enumerate(batch):
                x[row, :min(len(w), T)] = w[:T]
            out = model(x.to(device))
            for row, (i, w) in enumerate(batch):
                tokens = slice(row * width, row * width + min(len(w), T))  # routing is per flattened (B·width) token
                parts[i].append([None if r is None else Routing(*(t[tokens] for t in r)) for r in out.routing])
                nll[i] += float(F.cross_entropy(out.logits[row, :len(w) - 1], w[1:].to(device), reduction="sum"))
                served[i] = torch.cat([served[i], out.path[row, :min(len(w), T)].cpu()])
    return [Routed(n, [None if layer[0] is None else Routing(*(torch.cat(p) for p in zip(*layer))) for layer in zip(*per_window)],
                   loss / max(n - 1, 1) / math.log(2), int(path.bincount().argmax()))
            for n, per_window, loss, path in zip(sizes, parts, nll, served)]


def make_rows(model: GPT, texts: list[str], source: str, first_seq: int, desc: str | None = None) -> list[dict]:
    """Smart Sampler rows (see the schema above) for ``texts`` routed through ``model``, the first
    as the ``first_seq``-th record of its log."""
    return [make_row(text, routed, model.n_experts, source, first_seq + i)
            for i, (text, routed) in enumerate(zip(texts, route_records(model, texts, desc=desc)))]


def make_row(text: str, routed: Routed, n_experts: list[int], source: str, seq: int) -> dict:
    """The Smart Sampler row of one routed record."""
    return {"record_id": record_id(text), "source": source, "seq": seq, "text": text, "n_tokens": routed.n_tokens,
            **summarize(routed.routing, n_experts), "bpb": routed.bpb}


def write_rows(path: str | Path, rows: list[dict], schema: pa.Schema = SCHEMA) -> None:
    """Write rows atomically as one Parquet file with the Smart Sampler schema (or ``schema``)."""
    rows = [{**r, "expert_counts": [list(c.items()) for c in r["expert_counts"]]} for r in rows]
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)


def existing_ids(buffer_dir: str | Path) -> set[str]:
    ids: set[str] = set()
    for path in sorted(Path(buffer_dir).glob("buffer-*.parquet")):
        ids.update(read_buffer(path, columns=["record_id"])["record_id"].to_pylist())
    return ids


def read_buffer(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    try:
        table = pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable Smart Sampler buffer ({e})") from None
    missing = set(columns or SCHEMA.names) - set(table.column_names)
    if missing:
        raise DataError(f"{path}: Smart Sampler buffer lacks columns {sorted(missing)}")
    return table


def tokens_by_source(table: pa.Table) -> dict[str, torch.Tensor]:
    """The byte tokens of a Smart Sampler table's records, grouped by ``source`` (sorted)."""
    texts: dict[str, list[str]] = {}
    for text, source in zip(table["text"].to_pylist(), table["source"].to_pylist()):
        texts.setdefault(source, []).append(text)
    return {source: encode(t) for source, t in sorted(texts.items())}


def load_records(buffer_dir: str | Path) -> pa.Table:
    """Every record logged in ``buffer_dir`` (all buffer files, in flush order); none is an error."""
    paths = sorted(Path(buffer_dir).glob("buffer-*.parquet"))
    if not paths:
        raise DataError(f"{buffer_dir}: no Smart Sampler buffer files (buffer-*.parquet); run the collect stage")
    table = pa.concat_tables([read_buffer(p).select(SCHEMA.names).cast(SCHEMA) for p in paths])
    if table.num_rows == 0:
        raise DataError(f"{buffer_dir}: the Smart Sampler buffer holds no records")
    return table


class SmartSampler:
    """Buffers routed records and flushes them to Parquet; use as a context manager."""

    def __init__(self, buffer_dir: str | Path, flush_every: int = 256):
        self.buffer_dir = Path(buffer_dir)
        self.buffer_dir.mkdir(parents=True, exist_ok=True)
        self.flush_every = flush_every
        self.seen = existing_ids(self.buffer_dir)
        self.pending: list[dict] = []

    def record(self, model: GPT, texts: list[str], source: str, desc: str | None = None) -> list[bool]:
        """Route ``texts`` (a request's, or a batch of them) and buffer them; per text False if
        that record was already logged (earlier, or earlier in ``texts``)."""
        ids = [record_id(text) for text in texts]
        new: dict[str, str] = {}
        for rid, text in zip(ids, texts):
            if rid not in self.seen:
                new.setdefault(rid, text)
        # Every logged id is in ``seen`` (earlier runs' files included), so its size is the clock.
        self.pending += make_rows(model, list(new.values()), source, len(self.seen), desc)
        self.seen.update(new)
        if len(self.pending) >= self.flush_every:
            self.flush()
        return [new.pop(rid, None) is not None for rid in ids]

    def flush(self) -> Path | None:
        if not self.pending:
            return None
        n = len(list(self.buffer_dir.glob("buffer-*.parquet")))
        path = self.buffer_dir / f"buffer-{n:06d}.parquet"
        write_rows(path, self.pending)
        self.pending = []
        return path

    def __enter__(self) -> "SmartSampler":
        return self

    def __exit__(self, *exc) -> None:
        self.flush()
