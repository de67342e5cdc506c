"""How long a node takes to read its Raft logs back at restart, against reading the WAL alone.

A node's WAL holds one record per Ready batch, each with a few entries of several groups
(pykv.replica.durable.NodeLog). At restart ``NodeLog`` replays every record into each
group's log. Measured in the same run, on the same WAL: the replay, and the baseline of
reading and decoding the records only (``read_wal`` and ``unpack``): what no replay can
avoid. A replay that costs a multiple of the baseline that grows with the log is quadratic.

    python3 -m pytest benchmarks/bench_recovery.py -q -p no:randomly
    python3 benchmarks/bench_recovery.py --records 40000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from pykv._engine.wal import read_wal
from pykv.codec import unpack
from pykv.raft.messages import ConfState, Entry, HardState, Snapshot, SnapshotMeta
from pykv.replica.durable import GroupWork, NodeLog

GROUPS = 8
ENTRIES_PER_RECORD = 3  # per group with work in the batch, as under a steady bench load


def write_log(path: Path, records: int, snapshot: bool = False) -> None:
    """``records`` WAL records, each with entries for 4 of the groups, 100-byte commands;
    with ``snapshot``, each group then snapshots at 3/4 of its log, as a node's groups have
    snapshotted part of what its WAL still holds."""
    log = NodeLog(path)
    last = dict.fromkeys(range(GROUPS), 0)
    for n in range(records):
        work = []
        for group in ((n + k) % GROUPS for k in range(4)):
            first = last[group] + 1
            entries = tuple(Entry(1, i, data=b"c" * 100)
                            for i in range(first, first + ENTRIES_PER_RECORD))
            last[group] = entries[-1].index
            work.append(GroupWork(group, HardState(1, 1, first - 1), entries, None))
        log.persist(work, wait=False)
    if snapshot:
        for group, index in last.items():
            meta = SnapshotMeta(index * 3 // 4, 1, ConfState(frozenset({1, 2, 3})))
            log.persist([GroupWork(group, None, (), Snapshot(meta, b"state"))])
    log.close()


def replay(path: Path) -> float:
    start = time.perf_counter()
    log = NodeLog(path)
    took = time.perf_counter() - start
    assert len(log.groups()) == GROUPS
    log.close()
    return took


def read_only(path: Path) -> float:
    start = time.perf_counter()
    for record in read_wal(str(path / "wal")):
        unpack(record.payload)
    return time.perf_counter() - start


def _measure(benchmark, record, records: int, name: str, fn, subject: bool = False,
             snapshot: bool = False) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        write_log(Path(tmp), records, snapshot)
        took = benchmark.pedantic(fn, args=(Path(tmp),), rounds=3)
        record(f"restart, {records:,} records", name, took, subject=subject)


def test_replay_10k(benchmark, record) -> None:
    _measure(benchmark, record, 10_000, "NodeLog replay", replay, subject=True)


def test_replay_10k_three_quarters_snapshotted(benchmark, record) -> None:
    _measure(benchmark, record, 10_000, "NodeLog replay, 3/4 under a snapshot", replay,
             snapshot=True)


def test_read_only_10k(benchmark, record) -> None:
    _measure(benchmark, record, 10_000, "read and unpack only", read_only)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, nargs="+", default=[10_000, 40_000])
    args = parser.parse_args()
    for records in args.records:
        for snapshot in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                write_log(Path(tmp), records, snapshot)
                base, took = read_only(Path(tmp)), replay(Path(tmp))
            entries = records * 4 * ENTRIES_PER_RECORD
            under = ", 3/4 under a snapshot" if snapshot else ""
            print(f"{records:>7,} records ({entries:,} entries{under}): replay {took:6.2f} s, "
                  f"read and unpack only {base:5.2f} s (x{took / base:.1f})")


if __name__ == "__main__":
    main()
