"""What a node's held Raft log costs each full garbage collection (its pause), against baselines.

A node keeps up to 256,000 log entries until a snapshot (pykv.replica.host). A full
collection (generation 2) stops the node's event loop for its whole length. Measured in
the same run, with the same entries (200-byte commands):
- nothing held: the interpreter alone (what any collection costs);
- the entries held by a RaftLog (rows the collector no longer traverses);
- the entries held as Entry objects in a list (the log's layout before).

    python3 -m pytest benchmarks/bench_raftlog.py -q -p no:randomly
    python3 benchmarks/bench_raftlog.py
"""

from __future__ import annotations

import gc
import time

from pykv.raft.log import RaftLog
from pykv.raft.messages import Entry

HELD = 256_000


def _entries() -> list[Entry]:
    return [Entry(1, i, data=b"c" * 200) for i in range(1, HELD + 1)]


def _held_by_log() -> RaftLog:
    log = RaftLog()
    log.append(_entries())
    log.commit_to(HELD)
    log.applied_to(HELD)  # held until a snapshot, as a node's log is
    return log


def _full_collection() -> float:
    gc.collect()  # the first one after building untracks what it can
    start = time.perf_counter()
    gc.collect()
    return time.perf_counter() - start


def _pause(benchmark, record, name: str, subject: bool = False) -> None:
    gc.collect()
    benchmark(gc.collect)
    record("full gc pause", name, benchmark.stats.stats.median, subject=subject)


def test_full_collection_nothing_held(benchmark, record) -> None:
    _pause(benchmark, record, "nothing held")


def test_full_collection_log_held(benchmark, record) -> None:
    log = _held_by_log()
    _pause(benchmark, record, "RaftLog, 256k entries", subject=True)
    assert log.last_index() == HELD


def test_full_collection_entry_objects_held(benchmark, record) -> None:
    held = _entries()
    _pause(benchmark, record, "Entry objects, 256k")
    assert len(held) == HELD


def main() -> None:
    def best_of(rounds: int = 5) -> float:
        return min(_full_collection() for _ in range(rounds))

    print(f"full collection, best of 5 (ms), {HELD:,} entries of 200 bytes")
    print(f"  nothing held          {1000 * best_of():7.1f}")
    log = _held_by_log()
    print(f"  held by a RaftLog     {1000 * best_of():7.1f}")
    del log
    held = _entries()
    print(f"  Entry objects, a list {1000 * best_of():7.1f}")
    del held


if __name__ == "__main__":
    main()
