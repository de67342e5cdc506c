"""Storage benchmarks: durable commits/s and get latency against sqlite3, measured in the same run.

Run: python3 -m pytest benchmarks/bench_storage.py --benchmark-columns=mean,ops,rounds
The summary at the end gives the ratios (of medians):
- commit: durable single-key upserts per second with 1, 8 and 32 threads, pykv Storage.commit
  (fsync="always", group commit) against sqlite3 in WAL mode with synchronous=FULL doing the
  same upsert, one connection per thread (sqlite serialises writers; each commit fsyncs);
- get: point reads per second over 100,000 keys of 100 bytes, pykv from its cache, pykv with a
  cache too small to help (one pread each), and sqlite3 SELECT by primary key; plus p50/p99
  latency of single calls;
- restart: keys loaded per second when opening from the hint file vs replaying the whole WAL;
- notes: bytes per key of the KeyDir and of the sorted key index that scans use.
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
from sortedcontainers import SortedList

from pykv.storage import Storage, Update

N_KEYS = 100_000
VALUE = b"v" * 100  # the standard workload's 100-byte values
COMMITS_PER_ROUND = 1600
KEYS = [b"user:%08d" % i for i in range(N_KEYS)]


def run_threads(threads: int, total: int, work) -> None:
    """Split total operations over threads; work(thread_index, count) does its share."""
    share = total // threads
    pool = [threading.Thread(target=work, args=(t, share)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()


class SqliteUpserts:
    """sqlite3, WAL journal, synchronous=FULL: each autocommit upsert is durable on return."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.local = threading.local()
        setup = self.connection()
        setup.execute("PRAGMA journal_mode=WAL")
        setup.execute("CREATE TABLE IF NOT EXISTS kv (k BLOB PRIMARY KEY, v BLOB)")

    def connection(self) -> sqlite3.Connection:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=60)
            conn.execute("PRAGMA synchronous=FULL")
            self.local.conn = conn
        return conn

    def upsert(self, key: bytes, value: bytes) -> None:
        self.connection().execute(
            "INSERT INTO kv (k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
            (key, value))

    def fill(self) -> None:
        conn = self.connection()
        conn.execute("BEGIN")
        conn.executemany("INSERT OR REPLACE INTO kv VALUES (?, ?)", [(k, VALUE) for k in KEYS])
        conn.execute("COMMIT")

    def get(self, key: bytes) -> bytes:
        return self.connection().execute("SELECT v FROM kv WHERE k = ?", (key,)).fetchone()[0]


def fill_storage(store: Storage) -> None:
    for start in range(0, N_KEYS, 1000):
        store.commit([Update(k, VALUE, b"\x01\x01", 1) for k in KEYS[start:start + 1000]])


# --- durable commits --------------------------------------------------------------------------


def fresh_values(count: int, rng: random.Random) -> list[tuple[bytes, bytes]]:
    """(key, value) upserts; every value differs, so no engine can skip an unchanged write
    (sqlite does skip rewriting a row whose bytes are unchanged)."""
    return [(KEYS[rng.randrange(N_KEYS)], rng.randbytes(8) + VALUE[8:]) for _ in range(count)]


@pytest.mark.parametrize("threads", [1, 8, 32])
@pytest.mark.parametrize("engine", ["sqlite", "pykv"])
def test_commit(benchmark, record, tmp_path: Path, engine: str, threads: int) -> None:
    seeds = iter(range(1_000_000))
    if engine == "pykv":
        store = Storage.open(str(tmp_path / "pykv"), compaction=False)

        def work(t: int, count: int) -> None:
            for key, value in fresh_values(count, random.Random(next(seeds))):
                store.commit([Update(key, value, b"\x01\x01", 1)])
    else:
        store = SqliteUpserts(tmp_path / "sqlite.db")

        def work(t: int, count: int) -> None:
            for key, value in fresh_values(count, random.Random(next(seeds))):
                store.upsert(key, value)

    benchmark.group = f"durable commits, {threads} threads"
    benchmark.pedantic(run_threads, args=(threads, COMMITS_PER_ROUND, work), rounds=3, iterations=1)
    record(f"commit {threads:>2} threads", engine, benchmark.stats.stats.median,
           COMMITS_PER_ROUND // threads * threads, subject=engine == "pykv")
    if engine == "pykv":
        store.close()


# --- point reads ---------------------------------------------------------------------------------


def latency_percentiles(call, args: list) -> str:
    """p50/p99 of one call per argument, timed one by one."""
    samples = []
    clock = time.perf_counter_ns
    for arg in args:
        started = clock()
        call(arg)
        samples.append(clock() - started)
    samples.sort()
    p50, p99 = samples[len(samples) // 2], samples[len(samples) * 99 // 100]
    return f"p50 {p50 / 1000:.1f} us, p99 {p99 / 1000:.1f} us"


@pytest.mark.parametrize("engine", ["sqlite", "pykv-cached", "pykv-pread"])
def test_get(benchmark, record, note, tmp_path: Path, engine: str) -> None:
    if engine == "sqlite":
        store = SqliteUpserts(tmp_path / "sqlite.db")
        store.fill()
        get = store.get
    else:
        cache = 64 << 20 if engine == "pykv-cached" else 0
        store = Storage.open(str(tmp_path / "pykv"), cache_bytes=cache, compaction=False)
        fill_storage(store)
        get = store.get
    order = list(KEYS)
    random.Random(3).shuffle(order)
    lookups = order[:20_000]
    for key in lookups:  # warm the cache (and the OS page cache) equally for all
        get(key)

    def read_all() -> None:
        for key in lookups:
            get(key)

    benchmark.group = "point reads (100k keys, 100-byte values)"
    benchmark.pedantic(read_all, rounds=5, iterations=1)
    record("get", engine, benchmark.stats.stats.median, len(lookups), subject=engine == "pykv-cached")
    note(f"get latency {engine:<12} {latency_percentiles(get, lookups)}")
    if engine != "sqlite":
        store.close()


def test_memory_per_key(tmp_path: Path, note) -> None:
    """What the in-memory indexes cost per key (values stay on disk)."""
    with Storage.open(str(tmp_path / "pykv"), cache_bytes=0, compaction=False) as store:
        fill_storage(store)
        stats = store.stats()
    keys = [bytes(bytearray(k)) for k in KEYS]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    index = SortedList(keys)
    index_bytes = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    key_objects = sum(k.__sizeof__() for k in keys)
    note(f"storage memory per key ({N_KEYS:,} keys of 13 bytes): KeyDir "
         f"{stats['keydir_bytes'] / N_KEYS:.0f} B (C memory), sorted index "
         f"{(index_bytes + key_objects) / N_KEYS:.0f} B (SortedList {index_bytes / N_KEYS:.0f} B + "
         f"key objects {key_objects / N_KEYS:.0f} B; stats() estimate "
         f"{stats['key_index_bytes'] / N_KEYS:.0f} B)")
    assert len(index) == N_KEYS


# --- restart -------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["wal-replay", "hint"])
def test_restart(benchmark, record, tmp_path: Path, source: str) -> None:
    """Open time for 100,000 keys: from the hint file close() wrote, or replaying the whole WAL
    (the hint deleted; nothing was compacted, so every record is still there)."""
    path = str(tmp_path / "pykv")
    with Storage.open(path, compaction=False) as store:
        for start in range(0, N_KEYS, 100):  # 1,000 records of 100 keys
            store.commit([Update(k, VALUE, b"\x01\x01", 1) for k in KEYS[start:start + 100]])
    hint = Path(path) / "hint"
    opened: list[Storage] = []

    def setup() -> None:  # untimed: close the last round's store, drop the hint for replay
        while opened:
            opened.pop().close()
        if source == "wal-replay" and hint.exists():
            hint.unlink()

    def reopen() -> None:
        opened.append(Storage.open(path, compaction=False))

    benchmark.group = "restart with 100k keys"
    benchmark.pedantic(reopen, setup=setup, rounds=3, iterations=1)
    assert opened[0].stats()["keys"] == N_KEYS
    setup()
    record("restart (keys loaded)", source, benchmark.stats.stats.median, N_KEYS,
           subject=source == "hint")
