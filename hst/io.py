"""Atomic file output: write to a temporary sibling, then rename over the target.

A crash or a bad input mid-write therefore never leaves a half-written artifact, and the
previous version of the file stays intact until the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; on success rename it over ``path``.

    Works for files and directories (a directory target is swapped in after the old one is moved
    aside, so readers never see a mix of old and new files).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) / path.name
    try:
        yield tmp
        if tmp.is_dir() and path.exists():
            old = tmp.parent / (path.name + ".old")
            os.replace(path, old)
            os.replace(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_csv(path: str | os.PathLike, rows: list[dict], columns: list[str] | None = None) -> None:
    """Rows of equal keys as CSV (the format ``dvc plots`` reads); ``columns`` names them when
    there may be no rows."""
    cols = columns or (list(rows[0]) if rows else [])
    lines = [",".join(cols)] + [",".join(_fmt(r[c]) for c in cols) for r in rows]
    write_text(path, "\n".join(lines) + "\n")


def replace_section(path: str | os.PathLike, name: str, body: str) -> None:
    """Put ``body`` between the ``<!-- name:start -->`` and ``<!-- name:end -->`` markers of a
    Markdown file (generated tables in hand-written docs); the markers are appended if absent."""
    path = Path(path)
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if start in text and end in text.split(start, 1)[1]:
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1]
    else:
        head, tail = (text.rstrip("\n") + "\n\n" if text else ""), "\n"
    write_text(path, f"{head}{start}\n{body}\n{end}{tail}")


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)
