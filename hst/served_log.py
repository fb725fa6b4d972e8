"""The served log: a Smart Sampler row for every request row a server answers (``hst.serving``).

Rows have the Smart Sampler's columns (``hst.sampler.SCHEMA``: text, routing per layer, BPB) plus
the server's own request log: ``request_id``, ``kind`` (score / generate) and ``received_at`` (UTC,
wall clock: unlike the pipeline's logs this one is not a DVC output). The inbox flow turns the
written files into the next cycle (``hst.inbox.harvest``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from hst.sampler import SCHEMA, write_rows

SERVED_SCHEMA = pa.schema([*SCHEMA, ("request_id", pa.string()), ("kind", pa.string()),
                           ("received_at", pa.timestamp("ms", tz="UTC"))])
SERVED_GLOB = "served-*.parquet"


class ServedLog:
    """The Smart Sampler of a server: rows of served requests (:data:`SERVED_SCHEMA`), one per request
    row, written by a background thread to ``<dir>/served-<start>-<pid>-<n>.parquet`` (atomically,
    ``flush_every`` rows a file, or fewer after ``flush_seconds``).

    :meth:`add` never blocks on the disk and never raises: rows that cannot be kept — the log at
    ``max_bytes``, a writer more than ``4 * flush_every`` rows behind, an unwritable folder — are counted
    in :meth:`stats` and warned about, and the request is served all the same. A killed server loses
    the rows not yet written: at most ``flush_every`` plus the file being written.
    """

    def __init__(self, log_dir: str | Path, flush_every: int = 64, flush_seconds: float = 5.0,
                 max_bytes: int = 1 << 30):
        self.dir, self.flush_every, self.flush_seconds, self.max_bytes = Path(log_dir), flush_every, flush_seconds, max_bytes
        self.prefix = f"served-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        self.counts = {"logged": 0, "files": 0, "dropped_full": 0, "dropped_behind": 0, "failed": 0}
        self.pending: list[dict] = []
        self.oldest = 0.0  # monotonic time the first pending row arrived
        self.closed = False
        self.cond = threading.Condition()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            written = list(self.dir.glob(SERVED_GLOB))
            self.size = sum(p.stat().st_size for p in written)
            self.seq = sum(pq.ParquetFile(p).metadata.num_rows for p in written)
        except OSError as e:
            logging.warning("served log %s unusable (%s): requests are served but not logged", self.dir, e)
            self.size, self.seq = max_bytes, 0
        self.writer = threading.Thread(target=self._write_loop, name="served-log", daemon=True)
        self.writer.start()

    def add(self, rows: list[dict]) -> None:
        with self.cond:
            if self.size >= self.max_bytes:
                self._drop("dropped_full", rows, f"served log {self.dir} reached max_log_bytes")
            elif len(self.pending) + len(rows) > 4 * self.flush_every:
                self._drop("dropped_behind", rows, f"served log {self.dir}: the writer is behind")
            else:
                self.oldest = self.oldest if self.pending else time.monotonic()
                for row in rows:
                    self.pending.append({**row, "seq": self.seq})
                    self.seq += 1
                self.cond.notify()

    def stats(self) -> dict:
        with self.cond:
            return {**self.counts, "pending": len(self.pending), "dir": str(self.dir)}

    def close(self) -> None:
        """Write what is pending and stop the writer."""
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.writer.join()

    def _drop(self, reason: str, rows: list[dict], why: str) -> None:
        if self.counts[reason] == 0:
            logging.warning("%s: dropping records (counted in stats)", why)
        self.counts[reason] += len(rows)

    def _write_loop(self) -> None:
        while True:
            with self.cond:
                while not (self.closed or len(self.pending) >= self.flush_every
                           or (self.pending and time.monotonic() - self.oldest >= self.flush_seconds)):
                    self.cond.wait(self.flush_seconds if self.pending else None)
                batch, self.pending = self.pending[:self.flush_every], self.pending[self.flush_every:]
                self.oldest = time.monotonic() if self.pending else 0.0
                if not batch and self.closed:
                    return
            path = self.dir / f"{self.prefix}-{self.counts['files']:06d}.parquet"
            try:
                write_rows(path, batch, SERVED_SCHEMA)
                size = path.stat().st_size
            except Exception as e:  # a full or vanished disk must not take the server down
                with self.cond:
                    self._drop("failed", batch, f"served log {path}: {e}")
                continue
            with self.cond:
                self.size += size
                self.counts["files"] += 1
                self.counts["logged"] += len(batch)
