"""Serving under load, and a server killed mid-load: the real ``mlflow models serve`` process on
127.0.0.1, serving a checkpoint (by default the last cycle's champion) as ``hst.serving`` packages it.

Load: ``--clients`` threads send ``--requests`` requests in all, one row each — three of four score a
test record of a prepared domain (cut to ``--text-bytes``), one of four generates ``--new-bytes`` bytes
from one — with the Smart Sampler's log on and off, in the order off, on, on, off (so a drift in
machine load hits both alike); latency p50/p99 and requests/s per setting, and the logging overhead
(requests/s off / on − 1) over the pooled runs.

Kill: with the log on, the server's process group gets SIGKILL once half of the requests are
answered; a new server is started on the same log folder and answers the rest. Every request text is
unique, so the log is checked row by row: answered before the kill and logged (once), lost (answered,
never written: at most one flush batch, ``serve.flush_every``), duplicates (must be 0), unreadable
Parquet files (must be 0). Needs the pipeline's outputs (``dvc repro``). Writes a JSON (``--out``).

    python bench/bench_serve.py [--checkpoint models/c4_gcide.champion.pt] [--out docs/bench/serve.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from hst import data, serving
from hst.config import ServeConfig
from hst.params import load_section
from hst.served_log import SERVED_GLOB


def requests_for(n: int, text_bytes: int, new_bytes: int, tag: str) -> list[list[dict]]:
    """``n`` one-row requests over every prepared domain's test records, each text unique (``tag``, index)."""
    domains = data.prepared_domains("data/prepared")
    texts = [t for d in domains for t in data.load_records("data/prepared", d, "test")]
    out = []
    for i in range(n):
        text = f"[{tag} {i}] " + texts[i * 7 % len(texts)].encode()[:text_bytes].decode("utf-8", "ignore")
        out.append([{"prompt": text, "max_new_bytes": new_bytes, "temperature": 1.0, "seed": i}] if i % 4 == 3
                   else [{"text": text}])
    return out


def load(url: str, requests: list[list[dict]], clients: int, stop_after: int | None = None,
         on_stop=None) -> tuple[list[float], float, list[str]]:
    """Send ``requests`` from ``clients`` threads; latencies (s) of the answered ones, wall time, and the
    texts answered 200. With ``stop_after``, ``on_stop()`` runs once that many are answered."""
    latencies, answered, lock = [], [], threading.Lock()
    fired = threading.Event()

    def send(rows: list[dict]) -> None:
        t = time.perf_counter()
        try:
            status, _ = serving.invoke(url, rows, timeout=300)
        except OSError:  # the server was killed under this request
            return
        with lock:
            if status == 200:
                latencies.append(time.perf_counter() - t)
                answered.append(rows[0].get("text") or rows[0].get("prompt"))
            if stop_after is not None and len(answered) >= stop_after and not fired.is_set():
                fired.set()
                on_stop()

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(send, requests))
    return latencies, time.perf_counter() - start, answered


def summary(latencies: list[float], wall: float) -> dict:
    q = statistics.quantiles(latencies, n=100)
    return {"requests": len(latencies), "p50_ms": round(q[49] * 1000, 1), "p99_ms": round(q[98] * 1000, 1),
            "requests_per_s": round(len(latencies) / wall, 2)}


def read_log(log_dir: Path) -> tuple[list[str], int]:
    texts, bad = [], 0
    for path in sorted(log_dir.glob(SERVED_GLOB)):
        try:
            texts += pq.read_table(path, columns=["text"])["text"].to_pylist()
        except (pa.ArrowInvalid, OSError):
            bad += 1
    return texts, bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="models/c4_gcide.champion.pt")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=200, help="per load run, over all clients")
    ap.add_argument("--text-bytes", type=int, default=256)
    ap.add_argument("--new-bytes", type=int, default=32)
    ap.add_argument("--out", default="docs/bench/serve.json")
    args = ap.parse_args()
    cfg = load_section("params.yaml", "serve", ServeConfig)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        serving.save_model(Path(args.checkpoint), tmp / "model", cfg)
        runs: dict[str, list] = {"off": [], "on": []}
        for i, setting in enumerate(("off", "on", "on", "off")):
            env = {**os.environ, "HST_SERVE_LOG_DIR": str(tmp / f"log{i}") if setting == "on" else ""}
            proc, url = serving.start_server(str(tmp / "model"), tmp, env)
            try:
                serving.invoke(url, [{"text": "warm-up"}])
                runs[setting].append(load(url, requests_for(args.requests, args.text_bytes, args.new_bytes, f"run{i}"),
                                          args.clients)[:2])
                print(setting, summary(*runs[setting][-1]), flush=True)
            finally:
                serving.stop_server(proc)
        pooled = {s: summary([x for lat, _ in r for x in lat], sum(w for _, w in r)) for s, r in runs.items()}
        overhead = pooled["off"]["requests_per_s"] / pooled["on"]["requests_per_s"] - 1

        log_dir = tmp / "killed"
        env = {**os.environ, "HST_SERVE_LOG_DIR": str(log_dir)}
        reqs = requests_for(args.requests, args.text_bytes, args.new_bytes, "kill")
        proc, url = serving.start_server(str(tmp / "model"), tmp, env)
        _, _, before = load(url, reqs, args.clients, stop_after=args.requests // 2,
                            on_stop=lambda: serving.stop_server(proc, signal.SIGKILL))
        logged_at_kill = read_log(log_dir)[0]
        proc, url = serving.start_server(str(tmp / "model"), tmp, env)
        try:
            answered = set(before)
            _, _, after = load(url, [r for r in reqs if (r[0].get("text") or r[0].get("prompt")) not in answered],
                               args.clients)
        finally:
            serving.stop_server(proc)
        logged, unreadable = read_log(log_dir)
        counts = Counter(logged)
        kill = {"answered_before_kill": len(before), "logged_before_kill": len(set(before) & set(logged_at_kill)),
                "lost": len(set(before) - set(logged)), "answered_after_restart": len(after),
                "logged_after_restart": len(set(after) & set(logged)), "duplicates": sum(c - 1 for c in counts.values()),
                "unreadable_files": unreadable, "flush_every": cfg.flush_every}
    result = {"checkpoint": args.checkpoint, "clients": args.clients, "requests_per_run": args.requests,
              "text_bytes": args.text_bytes, "new_bytes": args.new_bytes, "runs": {s: [summary(*r) for r in v]
                                                                                  for s, v in runs.items()},
              "pooled": pooled, "logging_overhead": round(overhead, 4), "kill": kill}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
