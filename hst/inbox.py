"""The inbox: UTF-8 text files dropped into a folder become the next learn–consolidate cycle.

Files are claimed by *moving* them into ``<inbox>/processed/<batch>/`` (never deleting). A ledger of
content hashes (``<inbox>/processed/ledger.json``) remembers every claimed file, so a file whose
content was already claimed — dropped again, under any name — is moved to
``processed/duplicates/`` instead of being learned twice; a file that is not UTF-8 text goes to
``processed/rejected/``. Only files directly in the inbox count; dot-files are ignored (an upload
in progress should be written under a dot-name and renamed when complete).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from hst.io import write_json

LEDGER = "processed/ledger.json"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ledger(inbox: Path) -> dict[str, dict]:
    """Content hash -> ``{"batch", "file"}`` of every file ever claimed."""
    path = Path(inbox) / LEDGER
    return json.loads(path.read_text()) if path.is_file() else {}


def pending(inbox: Path) -> list[Path]:
    """Files waiting in the inbox whose content has not been claimed before, by name."""
    inbox = Path(inbox)
    if not inbox.is_dir():
        return []
    seen = ledger(inbox)
    return sorted(p for p in inbox.iterdir()
                  if p.is_file() and not p.name.startswith(".") and _sha(p) not in seen)


def pending_bytes(inbox: Path) -> int:
    return sum(p.stat().st_size for p in pending(inbox))


def _move(src: Path, folder: Path) -> Path:
    """Move ``src`` into ``folder`` without overwriting anything there (a clash gets a numbered name)."""
    folder.mkdir(parents=True, exist_ok=True)
    dest, n = folder / src.name, 1
    while dest.exists():
        dest, n = folder / f"{src.stem}.{n}{src.suffix}", n + 1
    os.replace(src, dest)
    return dest


def claim(inbox: Path, batch: str) -> list[Path]:
    """Move every waiting file into ``processed/<batch>/`` and record it; return the claimed files.

    Duplicates (already claimed content, also within this call) and non-UTF-8 files are moved aside.
    """
    inbox = Path(inbox)
    seen = ledger(inbox)
    claimed = []
    for path in (p for p in sorted(inbox.iterdir()) if p.is_file() and not p.name.startswith(".")):
        digest = _sha(path)
        if digest in seen:
            _move(path, inbox / "processed/duplicates")
            continue
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            _move(path, inbox / "processed/rejected")
            continue
        dest = _move(path, inbox / "processed" / batch)
        seen[digest] = {"batch": batch, "file": dest.name}
        write_json(inbox / LEDGER, seen)  # after every move: a crash loses no record of a claimed file
        claimed.append(dest)
    return claimed


def batch_text(inbox: Path, batch: str) -> str:
    """The claimed files of ``batch`` as one text, in name order, separated by blank lines."""
    files = sorted((Path(inbox) / "processed" / batch).iterdir())
    return "\n\n".join(p.read_text(encoding="utf-8").strip("\n") for p in files) + "\n"
