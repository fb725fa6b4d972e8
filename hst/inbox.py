"""The inbox: UTF-8 text files dropped into a folder become the next learn–consolidate cycle.

Files are claimed by *moving* them into ``<inbox>/processed/<batch>/`` (never deleting). A ledger of
content hashes (``<inbox>/processed/ledger.json``) remembers every claimed file, so a file whose
content was already claimed — dropped again, under any name — is moved to
``processed/duplicates/`` instead of being learned twice. Only regular files directly in the inbox
count: a symlink, device or fifo is never followed or read, it goes to ``processed/rejected/`` with
a ``.reason`` file beside it, as does a file that is not UTF-8 text. Dot-files are ignored (an
upload in progress should be written under a dot-name and renamed when complete). Every change to
the inbox happens under :func:`locked`, so concurrent runs never claim a file twice.

What a server answered is a source beside the dropped files: :func:`harvest` turns the written files
of its Smart Sampler log (:class:`hst.served_log.ServedLog`) into one inbox file.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import stat
import time
from contextlib import contextmanager
from pathlib import Path

from hst.data import SEPARATOR, DataError
from hst.io import read_json, write_json, write_text
from hst.sampler import read_buffer
from hst.served_log import SERVED_GLOB

LEDGER = "processed/ledger.json"
LOCK = "processed/.lock"
# Held by the inbox run that is learning (claim to gate), so no other run resumes its cycle meanwhile.
RUN_LOCK = "processed/.run.lock"


@contextmanager
def locked(inbox: Path, timeout: float = 600.0, name: str = LOCK):
    """Hold the inbox's exclusive lock ``name`` (released by the OS if the holder dies); TimeoutError
    after ``timeout`` seconds of waiting (0: one try)."""
    path = Path(inbox) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{path}: another inbox run has held the lock for {timeout:.0f} s") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ledger(inbox: Path) -> dict[str, dict]:
    """Content hash -> ``{"batch", "file"}`` of every file ever claimed."""
    path = Path(inbox) / LEDGER
    return read_json(path) if path.is_file() else {}


def _waiting(inbox: Path) -> list[Path]:
    """Entries directly in the inbox that are not folders or dot-names, by name (symlinks not followed)."""
    inbox = Path(inbox)
    if not inbox.is_dir():
        return []
    return sorted(p for p in inbox.iterdir() if not p.name.startswith(".") and not stat.S_ISDIR(p.lstat().st_mode))


def _sort(inbox: Path) -> tuple[list[tuple[Path, str]], list[Path], list[tuple[Path, str]]]:
    """Waiting entries as (accepted with content hash, duplicates, rejected with reason)."""
    seen = set(ledger(inbox))
    accepted, duplicates, rejected = [], [], []
    for path in _waiting(inbox):
        if not stat.S_ISREG(path.lstat().st_mode):
            rejected.append((path, "not a regular file (symlinks, devices and fifos are never followed)"))
            continue
        raw = path.read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        if digest in seen:
            duplicates.append(path)
            continue
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            rejected.append((path, f"not UTF-8 text (invalid byte at offset {e.start})"))
            continue
        seen.add(digest)
        accepted.append((path, digest))
    return accepted, duplicates, rejected


def pending(inbox: Path) -> list[Path]:
    """The files a claim would accept now: regular UTF-8 files whose content is new, by name."""
    return [p for p, _ in _sort(inbox)[0]]


def pending_bytes(inbox: Path) -> int:
    return sum(p.stat().st_size for p in pending(inbox))


def _move(src: Path, folder: Path) -> Path:
    """Move ``src`` into ``folder`` without overwriting anything there (a clash gets a numbered name)."""
    folder.mkdir(parents=True, exist_ok=True)
    dest, n = folder / src.name, 1
    while dest.exists() or dest.is_symlink():
        dest, n = folder / f"{src.stem}.{n}{src.suffix}", n + 1
    os.replace(src, dest)
    return dest


def reject(path: Path, folder: Path, reason: str) -> Path:
    """Move ``path`` (itself, never a link's target) into ``folder`` with ``<name>.reason`` beside it."""
    dest = _move(path, folder)
    write_text(dest.parent / f"{dest.name}.reason", reason + "\n")
    return dest


def claim(inbox: Path, batch: str, only: list[Path] | None = None) -> list[Path]:
    """Move every accepted waiting file (of ``only``, if given) into ``processed/<batch>/`` and record
    it; return the claimed files.

    Duplicates (already claimed content, also within this call) and rejected entries are moved aside.
    Call under :func:`locked`.
    """
    inbox = Path(inbox)
    accepted, duplicates, rejected = _sort(inbox)
    if only is not None:
        keep = set(only)
        accepted = [(p, d) for p, d in accepted if p in keep]
    for path in duplicates:
        _move(path, inbox / "processed/duplicates")
    for path, reason in rejected:
        reject(path, inbox / "processed/rejected", reason)
    seen, claimed = ledger(inbox), []
    for path, digest in accepted:
        dest = _move(path, inbox / "processed" / batch)
        seen[digest] = {"batch": batch, "file": dest.name}
        write_json(inbox / LEDGER, seen)  # after every move: a crash loses no record of a claimed file
        claimed.append(dest)
    return claimed


def join_text(files: list[Path]) -> str:
    """Files as one text, in the given order, separated by blank lines."""
    return join_texts(p.read_text(encoding="utf-8") for p in files)


def join_texts(texts) -> str:
    """Texts as one, in the given order, separated by blank lines (how prepare cuts records)."""
    return SEPARATOR.join(t.strip("\n") for t in texts) + "\n"


def batch_text(inbox: Path, batch: str) -> str:
    """The claimed files of ``batch`` as one text, in name order."""
    return join_text(sorted((Path(inbox) / "processed" / batch).iterdir()))


def harvest(log_dir: Path, inbox: Path) -> Path | None:
    """Move the served log's written files out of ``log_dir`` into one inbox file of their distinct
    texts, in the order they were served; return it (None when nothing was served).

    The files go to ``<log_dir>/harvested/`` (an unreadable one to ``<log_dir>/rejected/`` with its
    reason). The inbox file is named by the harvested files, so a harvest that dies before moving them
    writes the same file again on the next run. Call under :func:`locked`.
    """
    log_dir = Path(log_dir)
    texts: dict[str, str] = {}  # record id -> text: a text asked twice is learned once
    used = []
    for path in sorted(log_dir.glob(SERVED_GLOB)) if log_dir.is_dir() else []:
        try:
            table = read_buffer(path, columns=["record_id", "text"])
        except DataError as e:
            reject(path, log_dir / "rejected", str(e))
            continue
        for rid, text in zip(table["record_id"].to_pylist(), table["text"].to_pylist()):
            texts.setdefault(rid, text)
        used.append(path)
    if not used:
        return None
    out = Path(inbox) / f"served-{hashlib.sha256(' '.join(p.name for p in used).encode()).hexdigest()[:16]}.txt"
    write_text(out, join_texts(t for t in texts.values() if t.strip("\n")))
    for path in used:
        _move(path, log_dir / "harvested")
    return out
