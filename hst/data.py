"""Domain corpora: reading user/default sources, cutting them into records, splitting, tokenizing.

A *record* is the unit of splitting and of the Smart Sampler: blank-line separated paragraphs
(or dictionary entries, verses blocks, code blocks) merged until at least ``min_record_bytes``,
with paragraphs longer than ``max_record_bytes`` cut at line boundaries. Records are assigned to
train/val/test by a salted content hash, so the split is deterministic, independent of record
order, and identical records never straddle two splits.

Tokens are raw UTF-8 bytes (vocab 256); records are joined with a blank line.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import random
import shutil
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    import torch

from hst.config import HSTError, PrepareConfig
from hst.io import atomic_path

SPLITS = ("train", "val", "test")
SEPARATOR = "\n\n"


class DataError(HSTError):
    """A data file is missing, empty, not UTF-8 or not in the expected format."""


def read_source(path: str | Path) -> list[str]:
    """The documents of a source file: one text for .txt/.txt.gz, one per line/row for .jsonl/.parquet."""
    path = Path(path)
    if path.exists() and not path.is_file():  # a fifo would block the read forever, a device never end
        raise DataError(f"{path}: not a regular file (a directory, fifo or device); expected a .txt, .txt.gz, "
                        ".jsonl or .parquet file")
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected a .txt, .txt.gz, .jsonl or .parquet file)")
    name = path.name.lower()
    if name.endswith(".txt") or name.endswith(".txt.gz"):
        try:
            raw = gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes()
        except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            raise DataError(f"{path}: not a readable gzip file ({e})") from None
        docs = [_decode(raw, path)]
    elif name.endswith(".jsonl"):
        docs = []
        for n, line in enumerate(_decode(path.read_bytes(), path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DataError(f"{path}:{n}: expected an object with a string field 'text'")
            docs.append(obj["text"])
    elif name.endswith(".parquet"):
        docs = read_parquet_column(path, "text")
    else:
        raise DataError(f"{path}: unsupported file type (expected .txt, .txt.gz, .jsonl or .parquet)")
    if not any(d.strip() for d in docs):
        raise DataError(f"{path}: no text (the file is empty or whitespace only)")
    return docs


def read_parquet_column(path: str | Path, column: str) -> list:
    try:
        table = pq.read_table(path, columns=[column])
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file with column {column!r} ({e})") from None
    return table.column(column).to_pylist()


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 (invalid byte at offset {e.start})") from None


def cut_records(text: str, min_bytes: int, max_bytes: int) -> list[str]:
    """Cut a document into records of roughly ``min_bytes``..``max_bytes`` UTF-8 bytes."""
    pieces: list[str] = []
    for para in text.replace("\r\n", "\n").split(SEPARATOR):
        para = para.strip("\n")
        if not para.strip():
            continue
        pieces.extend(_cut_lines(para, max_bytes))
    records, current, size = [], [], 0
    for piece in pieces:
        n = len(piece.encode()) + (len(SEPARATOR) if current else 0)  # bytes this piece adds
        if current and size + n > max_bytes:
            records.append(SEPARATOR.join(current))
            current, size, n = [], 0, n - len(SEPARATOR)
        current.append(piece)
        size += n
        if size >= min_bytes:
            records.append(SEPARATOR.join(current))
            current, size = [], 0
    if current:
        records.append(SEPARATOR.join(current))
    return records


def _cut_lines(para: str, max_bytes: int) -> list[str]:
    if len(para.encode()) <= max_bytes:
        return [para]
    out, current, size = [], [], 0
    for line in (piece for line in para.split("\n") for piece in _cut_line(line, max_bytes - 1)):
        n = len(line.encode()) + 1
        if current and size + n > max_bytes:
            out.append("\n".join(current))
            current, size = [], 0
        current.append(line)
        size += n
    if current:
        out.append("\n".join(current))
    return out


def _cut_line(line: str, max_bytes: int) -> list[str]:
    """``line`` in pieces of at most ``max_bytes`` UTF-8 bytes, cut at its last space before the limit
    (the space dropped) or, with none, between two characters: however a text is laid out, no record
    grows past ``max_record_bytes``."""
    raw, out = line.encode(), []
    while len(raw) > max_bytes:
        cut = raw.rfind(b" ", 0, max_bytes + 1)
        if cut <= 0:
            cut = max_bytes
            while raw[cut] & 0xC0 == 0x80:  # a continuation byte: back up to the character's start
                cut -= 1
        out.append(raw[:cut].decode())
        raw = raw[cut:].lstrip(b" ")
    return out + [raw.decode()] if raw or not out else out


def record_id(text: str) -> str:
    """Stable content hash of a record (the Smart Sampler's record id)."""
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def assign_split(text: str, cfg: PrepareConfig) -> str:
    h = hashlib.blake2b(text.encode(), digest_size=8, salt=cfg.seed.to_bytes(8, "little"))
    u = int.from_bytes(h.digest(), "little") / 2**64
    if u < cfg.val_fraction:
        return "val"
    if u < cfg.val_fraction + cfg.test_fraction:
        return "test"
    return "train"


def split_domain(path: str | Path, cfg: PrepareConfig) -> dict[str, list[str]]:
    """Read a source and return its records per split (in source order within a split)."""
    return split_docs(read_source(path), cfg, str(path))


def split_docs(docs: list[str], cfg: PrepareConfig, where: str) -> dict[str, list[str]]:
    """Records per split of ``docs``; ``where`` names the source in the error when a split stays empty."""
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for doc in docs:
        for rec in cut_records(doc, cfg.min_record_bytes, cfg.max_record_bytes):
            out[assign_split(rec, cfg)].append(rec)
    for split, recs in out.items():
        if not recs:
            raise DataError(f"{where}: too little text for a non-empty {split} split "
                            f"({sum(map(len, out.values()))} records)")
    return out


def write_split(path: str | Path, records: list[str]) -> None:
    table = pa.table({"record_id": [record_id(r) for r in records], "text": records})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def split_path(prepared: str | Path, domain: str, split: str) -> Path:
    return Path(prepared) / domain / f"{split}.parquet"


def prepared_domains(prepared: str | Path) -> list[str]:
    """Domains present in a prepared directory, sorted."""
    if not Path(prepared).is_dir():
        raise DataError(f"{prepared}: not a directory of prepared domains")
    return sorted(p.name for p in Path(prepared).iterdir() if (p / "val.parquet").is_file())


def copy_domain(src: str | Path, dst: str | Path) -> None:
    """Copy the splits of the prepared domain directory ``src`` into the new directory ``dst``."""
    src, dst = Path(src), Path(dst)
    missing = [f"{s}.parquet" for s in SPLITS if not (src / f"{s}.parquet").is_file()]
    if missing:
        raise DataError(f"{src}: not a prepared domain (missing {', '.join(missing)})")
    dst.mkdir(parents=True)
    for s in SPLITS:
        shutil.copyfile(src / f"{s}.parquet", dst / f"{s}.parquet")


def load_records(prepared: str | Path, domain: str, split: str) -> list[str]:
    path = split_path(prepared, domain, split)
    if not path.is_file():
        raise DataError(f"{path}: missing; is {domain!r} listed in prepare.domains and prepared?")
    return read_parquet_column(path, "text")


def sample_records(records: list[str], n: int, seed: str) -> list[str]:
    """Up to ``n`` records drawn without replacement, reproducibly for the same ``seed``."""
    return random.Random(seed).sample(records, min(n, len(records)))


def encode(records: list[str]) -> torch.Tensor:
    """Byte tokens (uint8) of the records joined by a blank line."""
    import torch  # here, not at the top: the text-only stages (prepare, learned) skip its 1.2 s import

    data = SEPARATOR.join(records).encode("utf-8")
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())


def load_tokens(prepared: str | Path, domain: str, split: str) -> torch.Tensor:
    return encode(load_records(prepared, domain, split))


def unigram_bpb(train: torch.Tensor, val: torch.Tensor, vocab_size: int = 256) -> float:
    """Cross-entropy (bits/byte) of ``val`` under the add-one smoothed byte frequencies of ``train``."""
    import torch  # see encode

    counts = torch.bincount(train.long(), minlength=vocab_size).double() + 1
    logp = torch.log2(counts / counts.sum())
    return float(-logp[val.long()].mean())


def manifest_entry(records: dict[str, list[str]]) -> dict:
    return {split: {"records": len(recs), "bytes": len(SEPARATOR.join(recs).encode())}
            for split, recs in records.items()}


def window_starts(n_tokens: int, seq_len: int, n_windows: int) -> list[int]:
    """Evenly spaced start offsets of ``n_windows`` windows of ``seq_len + 1`` tokens."""
    last = n_tokens - seq_len - 1
    if last < 0:
        raise DataError(f"split too short for seq_len={seq_len}: {n_tokens} tokens")
    n = min(n_windows, last + 1)
    return [math.floor(i * last / max(n - 1, 1)) for i in range(n)]
