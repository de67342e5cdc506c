"""A child process for the crash tests: commits a known workload, printing each acknowledged commit.

Also importable (by path) for the deterministic workload and its verifier, so that the parent
checks exactly what the child wrote. Usage:

    storage_child.py load <path> <threads>        commit forever; print "ack <thread> <seq>"
    storage_child.py fill <path> <action>         write the fixed dataset, then run
                                                  action (compact | checkpoint | none)
    storage_child.py torn <path> <n>              commit n records, checkpoint halfway, exit
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading

from pykv.storage import Storage, Update

# --- the kill workload: per thread, a sequence of transactions --------------------------------


def value_of(thread: int, seq: int, part: str) -> bytes:
    """A value whose bytes (and length, 50..1500) are a function of who wrote it."""
    seed = hashlib.blake2b(f"{thread}/{seq}/{part}".encode(), digest_size=16).digest()
    return (seed * 100)[: 50 + seed[0] * 6]


def txn_updates(thread: int, seq: int) -> list[Update]:
    """Transaction seq of a thread: two new keys, its counter, and a delete of an older key."""
    clock = f"{thread}:{seq}".encode()
    prefix = f"t{thread}/"
    updates = [
        Update(f"{prefix}{seq:06d}/a".encode(), value_of(thread, seq, "a"), clock, seq),
        Update(f"{prefix}{seq:06d}/b".encode(), value_of(thread, seq, "b"), clock, seq),
        Update(f"{prefix}last".encode(), str(seq).encode(), clock, seq),
    ]
    if seq >= 3:
        updates.append(Update(f"{prefix}{seq - 3:06d}/b".encode(), None, clock, seq))
    return updates


def committed_count(store: Storage, thread: int) -> int:
    """How many transactions of the thread the store holds (its counter + 1)."""
    last = store.get(f"t{thread}/last".encode()).value
    return 0 if last is None else int(last) + 1


def verify_load(store: Storage, threads: int, acked: dict[int, int]) -> int:
    """Assert the store holds, per thread, an exact prefix of its transactions covering every
    acknowledged one; return the number of transactions found."""
    total = 0
    expected_keys = set()
    for thread in range(threads):
        n = committed_count(store, thread)
        floor = acked.get(thread, -1) + 1
        assert floor <= n <= floor + 1, f"thread {thread}: {n} txns present, {floor} acknowledged"
        clock_of_last = f"{thread}:{n - 1}".encode()
        if n:
            assert store.get(f"t{thread}/last".encode()).clock == clock_of_last
            expected_keys.add(f"t{thread}/last".encode())
        for seq in range(n + 2):
            for part in ("a", "b"):
                key = f"t{thread}/{seq:06d}/{part}".encode()
                got = store.get(key)
                live = seq < n and (part == "a" or seq >= n - 3)
                if live:
                    assert got.value == value_of(thread, seq, part), f"{key!r} wrong value"
                    assert got.clock == f"{thread}:{seq}".encode() and got.timestamp == seq
                    expected_keys.add(key)
                else:
                    assert got.value is None, f"{key!r} should be absent ({n} txns)"
        total += n
    live_keys = {key for key, _ in store.scan()}
    missing_or_extra = live_keys ^ expected_keys
    assert not missing_or_extra, f"unexpected key set difference {sorted(missing_or_extra)[:5]}"
    return total


def run_load(path: str, threads: int) -> None:
    store = Storage.open(path, segment_bytes=64 << 10, compaction=True,
                         compaction_interval=0.02)
    lock = threading.Lock()

    def worker(thread: int) -> None:
        seq = committed_count(store, thread)
        while True:
            store.commit(txn_updates(thread, seq))
            with lock:
                sys.stdout.write(f"ack {thread} {seq}\n")
                sys.stdout.flush()
            seq += 1

    for thread in range(threads):
        threading.Thread(target=worker, args=(thread,), daemon=True).start()
    threading.Event().wait()


# --- the fixed dataset for the failpoint tests ---------------------------------------------------

FILL_KEYS = 400
FILL_ROUNDS = 4


def fill_expected() -> dict[bytes, tuple[bytes, bytes, int]]:
    """key -> (value, clock, timestamp) after run_fill's commits."""
    expected = {}
    for rnd in range(FILL_ROUNDS):
        for i in range(FILL_KEYS):
            key = f"k{i:05d}".encode()
            if rnd == FILL_ROUNDS - 1 and i % 5 == 0:
                expected.pop(key, None)
            else:
                expected[key] = (value_of(rnd, i, "fill"), f"r{rnd}".encode(), rnd * 1000 + i)
    return expected


def fill_updates(rnd: int) -> list[list[Update]]:
    batches = []
    for start in range(0, FILL_KEYS, 20):
        batch = []
        for i in range(start, start + 20):
            key = f"k{i:05d}".encode()
            if rnd == FILL_ROUNDS - 1 and i % 5 == 0:
                batch.append(Update(key, None, b"", 0))
            else:
                batch.append(Update(key, value_of(rnd, i, "fill"), f"r{rnd}".encode(), rnd * 1000 + i))
        batches.append(batch)
    return batches


def verify_fill(store: Storage) -> None:
    expected = fill_expected()
    got = {key: (v.value, v.clock, v.timestamp) for key, v in store.scan()}
    assert got == expected


def run_fill(path: str, action: str) -> None:
    import pykv.storage.store as store_module

    store_module.RELOCATE_BATCH_BYTES = 8 << 10  # several relocation records, to crash between
    store = Storage.open(path, segment_bytes=32 << 10, compaction=False)
    for rnd in range(FILL_ROUNDS):
        for batch in fill_updates(rnd):
            store.commit(batch)
    if action == "compact":
        store.compact()
    elif action == "checkpoint":
        store.checkpoint()
    os._exit(0)  # no close(): the crash tests want what is on disk, not a final checkpoint


# --- the torn-tail workload ----------------------------------------------------------------------


def torn_updates(n: int) -> list[Update]:
    return [Update(f"torn{n % 7}".encode(), value_of(7, n, "torn"), f"c{n}".encode(), n),
            Update(f"each{n:05d}".encode(), value_of(8, n, "each"), b"", n)]


def run_torn(path: str, count: int) -> None:
    store = Storage.open(path, compaction=False)
    for n in range(count):
        store.commit(torn_updates(n))
        if n == count // 2:
            store.checkpoint()
    os._exit(0)


if __name__ == "__main__":
    mode, target = sys.argv[1], sys.argv[2]
    if mode == "load":
        run_load(target, int(sys.argv[3]))
    elif mode == "fill":
        run_fill(target, sys.argv[3])
    elif mode == "torn":
        run_torn(target, int(sys.argv[3]))
    else:
        raise SystemExit(f"unknown mode {mode}")
