"""The standard 4-op transaction on pykv's embedded store, sqlite3 and LMDB, with equal durability.

Every engine runs the same workload (DESIGN §7): read 2 keys, write 2 keys (one
read-modify-write, one blind write), keys uniform over 100,000, 100-byte values, N threads
with one transaction in flight each, and every commit durable before it returns:

- pykv:    pykv.open(dir) (fsync="always": group commit, one fdatasync per batch)
- sqlite3: WAL journal, synchronous=FULL (the WAL is fsync'd at every commit), one
           connection per thread, BEGIN IMMEDIATE (writers serialize: no conflicts to retry)
- LMDB:    lmdb.open(sync=True, metasync=True), one write transaction per 4-op transaction

Figures are reported as ratios to pykv measured in the same run, never asserted.

From the repo root; the pytest form works as is (``python3 -m`` puts the root on
sys.path and benchmarks/conftest.py collects bench_*.py), the script form needs pykv
installed (``pip install -e .``):

    python3 -m pytest benchmarks/bench_embedded.py --benchmark-only -s   # 1 and 8 threads, 2 s
    python3 benchmarks/bench_embedded.py --threads 8 --duration 5
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import lmdb

import pykv
from pykv.server.workload import (
    WorkloadConfig,
    key_name,
    modify_value,
    percentile,
    preload,
    run_workload,
)

KEYS = 100_000
VALUE_BYTES = 100

# One 4-op transaction: (read keys, read-modify-write key, blind key, blind value) -> None
Txn = Callable[[list[str], str, bytes], None]


def _drive(make_txn: Callable[[], Txn], threads: int, duration: float) -> dict:
    """Run the 4-op workload on ``threads`` threads; make_txn() gives each thread its runner."""
    latencies: list[list[float]] = [[] for _ in range(threads)]
    start = time.perf_counter()
    deadline = start + duration

    def client(index: int) -> None:
        run = make_txn()
        rng = random.Random(index)
        mine = latencies[index]
        while time.perf_counter() < deadline:
            a, b, c = (key_name(i) for i in rng.sample(range(KEYS), 3))
            t0 = time.perf_counter()
            run([a, b], c, rng.randbytes(VALUE_BYTES))
            mine.append(time.perf_counter() - t0)

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    elapsed = time.perf_counter() - start
    merged = sorted(x for per in latencies for x in per)
    return {
        "tps": len(merged) / elapsed,
        "p50_ms": percentile(merged, 50) * 1000,
        "p99_ms": percentile(merged, 99) * 1000,
    }


def bench_sqlite(directory: Path, threads: int, duration: float) -> dict:
    path = directory / "bench.sqlite"
    setup = sqlite3.connect(path, isolation_level=None)
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute("CREATE TABLE kv (k TEXT PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID")
    rng = random.Random(0)
    setup.execute("BEGIN")
    setup.executemany("INSERT INTO kv VALUES (?, ?)",
                      ((key_name(i), rng.randbytes(VALUE_BYTES)) for i in range(KEYS)))
    setup.execute("COMMIT")
    setup.close()
    connections: list[sqlite3.Connection] = []

    def make_txn() -> Txn:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=60)
        conn.execute("PRAGMA synchronous=FULL")
        connections.append(conn)
        rng = random.Random()

        def run(reads: list[str], blind: str, value: bytes) -> None:
            conn.execute("BEGIN IMMEDIATE")  # serializable: the write lock is taken up front
            try:
                got = [conn.execute("SELECT v FROM kv WHERE k = ?", (k,)).fetchone() for k in reads]
                old = got[0][0] if got[0] else None
                conn.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)",
                             (reads[0], modify_value(old, rng, VALUE_BYTES)))
                conn.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (blind, value))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

        return run

    try:
        return _drive(make_txn, threads, duration)
    finally:
        for conn in connections:
            conn.close()


def bench_lmdb(directory: Path, threads: int, duration: float) -> dict:
    env = lmdb.open(str(directory / "bench.lmdb"), map_size=1 << 30, sync=True, metasync=True,
                    max_readers=threads + 8, lock=True)
    rng = random.Random(0)
    with env.begin(write=True) as txn:
        for i in range(KEYS):
            txn.put(key_name(i).encode(), rng.randbytes(VALUE_BYTES))

    def make_txn() -> Txn:
        rng = random.Random()

        def run(reads: list[str], blind: str, value: bytes) -> None:
            with env.begin(write=True) as txn:  # LMDB serializes write transactions
                got = [txn.get(k.encode()) for k in reads]
                txn.put(reads[0].encode(), modify_value(got[0], rng, VALUE_BYTES))
                txn.put(blind.encode(), value)

        return run

    try:
        return _drive(make_txn, threads, duration)
    finally:
        env.close()


def bench_pykv(directory: Path, threads: int, duration: float) -> dict:
    config = WorkloadConfig(keys=KEYS, value_bytes=VALUE_BYTES, ops=4, clients=threads,
                            duration=duration)
    with pykv.open(directory / "bench.pykv") as store:
        preload(store, config)
        result = run_workload(store, config)
    out = result.to_dict()
    return {"tps": out["tps"], "p50_ms": out["p50_ms"], "p99_ms": out["p99_ms"],
            "abort_rate": out["abort_rate"]}


ENGINES = {"pykv": bench_pykv, "sqlite3": bench_sqlite, "lmdb": bench_lmdb}


def compare(threads: int, duration: float) -> dict[str, dict]:
    """Run every engine once in fresh temporary directories; add tps ratios to pykv."""
    results = {}
    for name, bench in ENGINES.items():
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
            results[name] = bench(Path(tmp), threads, duration)
    for result in results.values():
        result["tps_vs_pykv"] = result["tps"] / results["pykv"]["tps"]
    return results


def _print(results: dict[str, dict], threads: int, duration: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"4-op transactions, {threads} threads, {duration:g} s each, fsync per commit")
    for column in ("engine", "tps", "p50 ms", "p99 ms", "tps / pykv"):
        table.add_column(column, justify="right")
    for name, r in results.items():
        table.add_row(name, f"{r['tps']:,.0f}", f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}",
                      f"{r['tps_vs_pykv']:.2f}")
    Console().print(table)


def test_embedded_against_sqlite_and_lmdb(benchmark) -> None:
    """pytest-benchmark entry: one short comparison at 1 and 8 threads, ratios in extra_info."""
    runs = benchmark.pedantic(lambda: {t: compare(t, 2.0) for t in (1, 8)}, rounds=1, iterations=1)
    for threads, results in runs.items():
        for name, r in results.items():
            for field, value in r.items():
                benchmark.extra_info[f"{threads}t.{name}.{field}"] = round(value, 4)
        _print(results, threads, 2.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    for threads in args.threads:
        _print(compare(threads, args.duration), threads, args.duration)


if __name__ == "__main__":
    main()
