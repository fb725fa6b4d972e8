"""Atomic file output: write to a temporary sibling, then rename over the target.

A crash or a bad input mid-write therefore never leaves a half-written artifact, and the
previous version of the file stays intact until the new one is complete. Inside
:func:`committed_together` the renames wait until the block ends, so a process that fails or is
killed midway leaves *all* its targets at their previous version, never a mix of old and new.
Temporary siblings carry the writer's pid; one left by a killed process is removed by the next
write of the same target.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from hst.config import HSTError


class ArtifactError(HSTError):
    """An artifact an earlier stage wrote is missing, unreadable or lacks what its reader needs."""

# The transaction of the current context: temp roots still being written ("open") and finished
# targets waiting for their rename ("pending"); None outside committed_together.
_TRANSACTION: ContextVar[dict | None] = ContextVar("hst_io_transaction", default=None)


@contextmanager
def committed_together():
    """Hold back the renames of the atomic_path targets completed inside the block until it ends
    without error; then rename them all (an error or a kill before that leaves every target as it was)."""
    tx = {"open": [], "pending": []}
    token = _TRANSACTION.set(tx)
    try:
        yield
        for tmp, path in tx["pending"]:
            _swap_in(tmp, path)
    finally:
        _TRANSACTION.reset(token)
        for tmp, _ in tx["pending"]:
            shutil.rmtree(tmp.parent, ignore_errors=True)


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; on success rename it over ``path``.

    Works for files and directories (a directory target is swapped in after the old one is moved
    aside, so readers never see a mix of old and new files).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    root = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", dir=path.parent))
    tmp = root / path.name
    tx = _TRANSACTION.get()
    # A target inside another target's temp dir is invisible until that one is renamed: no need to wait.
    defer = tx is not None and not any(path.is_relative_to(r) for r in tx["open"])
    if tx is not None:
        tx["open"].append(root)
    try:
        yield tmp
        if defer:
            tx["pending"].append((tmp, path))
        else:
            _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    finally:
        if tx is not None:
            tx["open"].remove(root)
    if not defer:
        shutil.rmtree(root, ignore_errors=True)


def _swap_in(tmp: Path, path: Path) -> None:
    """Put ``tmp`` at ``path``. A directory replacing a directory is exchanged with it in one step
    where the kernel can (Linux renameat2), so a kill never leaves ``path`` missing; elsewhere the old
    one is moved aside first (a kill between the two renames leaves it missing until the next write)."""
    if tmp.is_dir() and path.is_dir() and not path.is_symlink():
        if _exchange(tmp, path):
            return  # the old directory is now at tmp, removed with its temp root
        os.replace(path, tmp.parent / (path.name + ".old"))
    os.replace(tmp, path)


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not glibc >= 2.28
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a file system without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def remove_stale(path: str | os.PathLike) -> list[Path]:
    """Remove temporary siblings of ``path`` left by writers that no longer run; return them."""
    path = Path(path)
    removed = []
    for cand in map(Path, glob.glob(glob.escape(str(path.parent / f".{path.name}.")) + "*")):
        pid = cand.name[len(path.name) + 2:].split(".")[0]
        if cand.is_dir() and not cand.is_symlink() and not (pid.isdigit() and _alive(int(pid))):
            shutil.rmtree(cand, ignore_errors=True)
            removed.append(cand)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_json(path: str | os.PathLike, keys: tuple[str, ...] | None = ()):
    """JSON written by an earlier stage: an object holding ``keys`` (``keys=None``: a list). A missing,
    corrupt or incomplete file is a one-line ``ArtifactError``."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, list if keys is None else dict):
        raise ArtifactError(f"{path}: expected a JSON {'list' if keys is None else 'object'}")
    if keys is None:
        return obj
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ArtifactError(f"{path}: missing key(s) {missing}")
    return obj


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
