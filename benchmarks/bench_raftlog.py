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

from gcpause import best_full_collection, record_pause

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


def test_full_collection_nothing_held(benchmark, record) -> None:
    record_pause(benchmark, record, "raft log", "nothing held")


def test_full_collection_log_held(benchmark, record) -> None:
    log = _held_by_log()
    record_pause(benchmark, record, "raft log", "RaftLog, 256k entries", subject=True)
    assert log.last_index() == HELD


def test_full_collection_entry_objects_held(benchmark, record) -> None:
    held = _entries()
    record_pause(benchmark, record, "raft log", "Entry objects, 256k")
    assert len(held) == HELD


def main() -> None:
    print(f"full collection, best of 5 (ms), {HELD:,} entries of 200 bytes")
    print(f"  nothing held          {1000 * best_full_collection():7.1f}")
    log = _held_by_log()
    print(f"  held by a RaftLog     {1000 * best_full_collection():7.1f}")
    del log
    held = _entries()
    print(f"  Entry objects, a list {1000 * best_full_collection():7.1f}")
    del held


if __name__ == "__main__":
    main()
