"""NodeLog: many groups' Raft logs in one WAL, recovered exactly as persisted."""

from __future__ import annotations

from pykv.raft.messages import ConfState, Entry, HardState, Snapshot, SnapshotMeta
from pykv.replica.durable import GroupWork, NodeLog, SnapshotFile, snapshot_data


def _entries(term: int, first: int, last: int, tag: str = "") -> tuple[Entry, ...]:
    return tuple(Entry(term, i, data=f"{tag}{i}".encode()) for i in range(first, last + 1))


def test_groups_share_one_record_and_recover_separately(tmp_path):
    log = NodeLog(tmp_path)
    lsn = log.persist([
        GroupWork(1, HardState(2, 1, 3), _entries(2, 1, 3), None),
        GroupWork(7, HardState(5, None, 1), _entries(5, 1, 2), None),
    ])
    assert lsn == log.wal.last_lsn  # one WAL record (one fsync) for both groups
    log.close()
    again = NodeLog(tmp_path)
    one, seven = again.persistent_state(1), again.persistent_state(7)
    assert one.hard_state == HardState(2, 1, 3) and [e.index for e in one.entries] == [1, 2, 3]
    assert seven.hard_state.term == 5 and len(seven.entries) == 2
    assert again.persistent_state(3) is None
    again.close()


def test_a_new_leaders_entries_replace_the_conflicting_suffix(tmp_path):
    log = NodeLog(tmp_path)
    log.persist([GroupWork(1, HardState(1, 1, 0), _entries(1, 1, 5, "old"), None)])
    log.persist([GroupWork(1, HardState(2, 2, 0), _entries(2, 3, 4, "new"), None)])
    log.close()
    state = NodeLog(tmp_path).persistent_state(1)
    assert [(e.index, e.term, e.data) for e in state.entries] == [
        (1, 1, b"old1"), (2, 1, b"old2"), (3, 2, b"new3"), (4, 2, b"new4")
    ]


def test_a_snapshot_cuts_the_log_before_it(tmp_path):
    log = NodeLog(tmp_path)
    log.persist([GroupWork(1, HardState(1, 1, 6), _entries(1, 1, 6), None)])
    snap = Snapshot(SnapshotMeta(4, 1, ConfState(frozenset({1, 2, 3}))), b"state@4")
    log.save_snapshot(1, snap)
    log.compacted(1, 4)
    log.close()
    state = NodeLog(tmp_path).persistent_state(1)
    assert state.snapshot.meta.index == 4
    # Recovery keeps a handle, not the image: it is read from the file only when needed.
    assert isinstance(state.snapshot.data, SnapshotFile)
    assert snapshot_data(state.snapshot.data) == b"state@4"
    assert [e.index for e in state.entries] == [5, 6]


def test_a_dropped_group_comes_back_empty(tmp_path):
    log = NodeLog(tmp_path)
    log.persist([GroupWork(2, HardState(3, 1, 2), _entries(3, 1, 2), None)])
    log.save_snapshot(2, Snapshot(SnapshotMeta(1, 3), b"old"))
    log.drop(2)
    log.close()
    again = NodeLog(tmp_path)
    assert again.persistent_state(2) is None
    again.persist([GroupWork(2, HardState(9, None, 0), _entries(9, 1, 1, "fresh"), None)])
    again.close()
    state = NodeLog(tmp_path).persistent_state(2)
    assert state.snapshot is None and [e.data for e in state.entries] == [b"fresh1"]


def test_truncation_keeps_what_any_group_still_needs(tmp_path):
    log = NodeLog(tmp_path)
    log.wal.close()
    from pykv._engine.wal import WalWriter

    log.wal = WalWriter(str(log.wal_dir), segment_bytes=4096)  # small segments to delete
    payload = "x" * 200
    for i in range(1, 60):
        log.persist([GroupWork(1, HardState(1, 1, i), (Entry(1, i, data=payload),), None)])
    log.persist([GroupWork(2, HardState(1, 1, 1), (Entry(1, 1, data=b"keep"),), None)])
    for i in range(60, 80):
        log.persist([GroupWork(1, HardState(1, 1, i), (Entry(1, i, data=payload),), None)])
    segments = len(log.wal.segments())
    log.save_snapshot(1, Snapshot(SnapshotMeta(70, 1), b"s70"))
    log.compacted(1, 70)
    assert log.truncate() == 0 or len(log.wal.segments()) < segments
    log.close()
    again = NodeLog(tmp_path)
    assert [e.data for e in again.persistent_state(2).entries] == [b"keep"]  # group 2 kept
    one = again.persistent_state(1)
    assert one.snapshot.meta.index == 70 and [e.index for e in one.entries] == list(range(71, 80))
    assert one.hard_state.commit == 79
    again.close()
