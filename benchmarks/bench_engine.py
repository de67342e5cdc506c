"""Engine benchmarks: KeyDir against a dict, and group-commit WAL commits/s against baselines.

Run: python3 -m pytest benchmarks/bench_engine.py --benchmark-columns=mean,ops,rounds
The summary at the end gives the ratios (of medians), all measured in the same run:
- keydir: get/put per second of KeyDir against a dict holding the same records, and the
  bytes per key of each (KeyDir.memory_bytes() against tracemalloc of the dict build);
- wal: durable commits per second with 1, 8 and 64 writer threads, for the pykv WAL under
  fsync="always" with preallocated segments (what the node and the embedded store use) and
  without, a plain file with one write + fdatasync per commit under a lock, and sqlite3 in
  WAL mode with synchronous=FULL (one INSERT committed per append).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import tracemalloc

import pytest

from pykv._engine.keydir import KeyDir
from pykv._engine.wal import WalWriter

N_KEYS = 100_000
KEYS = [b"user:%08d" % i for i in range(N_KEYS)]
# Lookups use equal but distinct key objects, as keys arriving in requests would be.
LOOKUP_KEYS = [bytes(bytearray(k)) for k in KEYS]
CLOCK = bytes.fromhex("0103020504")  # a 3-node clock, as stored for a typical key
PAYLOAD = b"v" * 100                  # the standard workload's 100-byte values


def fill_keydir() -> KeyDir:
    table = KeyDir(capacity=N_KEYS)
    for i, key in enumerate(KEYS):
        table.put(key, 7, i * 128, 100, CLOCK, i)
    return table


def fill_dict() -> dict:
    table = {}
    for i, key in enumerate(KEYS):
        table[key] = (7, i * 128, 100, CLOCK, i)
    return table


# --- key directory -----------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["dict", "keydir"])
def test_put(benchmark, record, impl: str) -> None:
    build = fill_keydir if impl == "keydir" else fill_dict
    benchmark.group = "keydir put (100k keys)"
    benchmark.pedantic(build, rounds=5, iterations=1)
    record("keydir put", impl, benchmark.stats.stats.median, N_KEYS, subject=impl == "keydir")


@pytest.mark.parametrize("impl", ["dict", "keydir"])
def test_get(benchmark, record, impl: str) -> None:
    table = fill_keydir() if impl == "keydir" else fill_dict()
    get = table.get

    def lookup_all() -> None:
        for key in LOOKUP_KEYS:
            get(key)

    benchmark.group = "keydir get (100k keys)"
    benchmark.pedantic(lookup_all, rounds=5, iterations=1)
    record("keydir get", impl, benchmark.stats.stats.median, N_KEYS, subject=impl == "keydir")


def test_bytes_per_key(note) -> None:
    # The dict's cost is what Python allocates for it: keys are the same bytes objects in
    # both cases, so they count for the dict (it must keep them) but not the KeyDir (which
    # copies them into C memory, counted by memory_bytes()).
    keys_copy = [bytes(bytearray(k)) for k in KEYS]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    table = {}
    for i, key in enumerate(keys_copy):
        table[key] = (7, i * 128 + 2**40, 100, bytes(bytearray(CLOCK)), i + 2**40)
    dict_bytes = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    keys_bytes = sum(len(k) + 33 for k in keys_copy)  # bytes objects already existed
    keydir = fill_keydir()
    per_key_keydir = keydir.memory_bytes() / N_KEYS
    per_key_dict = (dict_bytes + keys_bytes) / N_KEYS
    note(
        f"bytes/key, 100k keys of 13 bytes with a 5-byte clock: KeyDir {per_key_keydir:.0f}, "
        f"dict of tuples {per_key_dict:.0f} (x{per_key_dict / per_key_keydir:.2f} more)"
    )
    assert len(table) == len(keydir)


# --- WAL group commit --------------------------------------------------------------------------

# Commits per round, shared by the writers (fewer for one writer: it waits for every fsync).
COMMITS = {1: 300, 8: 1200, 64: 2560}


def run_writers(writers: int, commit) -> None:
    per_writer = COMMITS[writers] // writers

    def work() -> None:
        for _ in range(per_writer):
            commit(PAYLOAD)

    threads = [threading.Thread(target=work) for _ in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


class FsyncPerCommit:
    """The naive log: every commit is its own write() + fdatasync() under a lock."""

    def __init__(self, directory: str) -> None:
        self.fd = os.open(os.path.join(directory, "naive.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        self.lock = threading.Lock()

    def commit(self, payload: bytes) -> None:
        record = len(payload).to_bytes(4, "little") + payload
        with self.lock:
            os.write(self.fd, record)
            os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


class SqliteWal:
    """sqlite3 in WAL mode, synchronous=FULL: one INSERT committed per append."""

    def __init__(self, directory: str) -> None:
        self.db = sqlite3.connect(os.path.join(directory, "log.db"), check_same_thread=False,
                                  isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS log (lsn INTEGER PRIMARY KEY, payload BLOB)")
        self.lock = threading.Lock()

    def commit(self, payload: bytes) -> None:
        with self.lock:
            self.db.execute("BEGIN")
            self.db.execute("INSERT INTO log (payload) VALUES (?)", (payload,))
            self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()


class PykvWal:
    preallocate = True

    def __init__(self, directory: str) -> None:
        self.writer = WalWriter(os.path.join(directory, "wal"), fsync="always", preallocate=self.preallocate)
        self.commit = self.writer.append

    def close(self) -> None:
        self.writer.close()


class PykvWalGrowing(PykvWal):
    """Segments that grow with each append: every fdatasync also records a new file size."""

    preallocate = False


SUBJECT = "pykv wal (always)"
IMPLS = {SUBJECT: PykvWal, "pykv wal, not preallocated": PykvWalGrowing,
         "fsync per commit": FsyncPerCommit, "sqlite wal full": SqliteWal}


# The implementations alternate (impl varies fastest) so that they meet the same disk
# weather; figures are medians of 5 rounds.
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("writers", [1, 8, 64])
def test_wal_commits(benchmark, record, tmp_path, impl: str, writers: int) -> None:
    log = IMPLS[impl](str(tmp_path))
    try:
        benchmark.group = f"wal commits, {writers} writers"
        benchmark.pedantic(run_writers, args=(writers, log.commit), rounds=5, iterations=1)
    finally:
        log.close()
    record(f"wal commits, {writers:>2} writers", impl, benchmark.stats.stats.median, COMMITS[writers],
           subject=impl == SUBJECT)
