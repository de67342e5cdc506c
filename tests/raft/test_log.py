"""RaftLog: the entries it hands back, its limits and marks, and what it costs the collector."""

from __future__ import annotations

import gc

import pytest

from pykv.raft.errors import RaftInvariantError
from pykv.raft.log import RaftLog
from pykv.raft.messages import ConfChange, ConfChangeKind, Entry, EntryKind, SnapshotMeta


def _log(count: int, term: int = 1, data: bytes = b"x" * 10) -> RaftLog:
    log = RaftLog()
    log.append([Entry(term, i, data=data + str(i).encode()) for i in range(1, count + 1)])
    return log


def test_entries_come_back_as_they_went_in() -> None:
    change = ConfChange.single(ConfChangeKind.ADD_NODE, 4).to_wire()
    log = RaftLog()
    log.append([Entry(1, 1, data=b"a"), Entry(2, 2, EntryKind.CONF_CHANGE, change), Entry(2, 3)])
    assert log.entries_from(1) == [
        Entry(1, 1, EntryKind.NORMAL, b"a"), Entry(2, 2, EntryKind.CONF_CHANGE, change), Entry(2, 3),
    ]
    assert log.entry(2).kind is EntryKind.CONF_CHANGE
    assert log.entry(4) is None
    assert (log.term(3), log.last_term(), log.last_index()) == (2, 2, 3)


def test_slice_keeps_to_its_limits_but_returns_at_least_one_entry() -> None:
    log = _log(10, data=b"x" * 100)  # 101-102 bytes each
    assert [e.index for e in log.slice(3, 8)] == [3, 4, 5, 6, 7]
    assert [e.index for e in log.slice(3, 8, max_entries=2)] == [3, 4]
    assert [e.index for e in log.slice(3, 20, max_bytes=250)] == [3, 4]
    assert [e.index for e in log.slice(3, 20, max_bytes=10)] == [3]  # one, however large
    assert log.slice(11, 20) == []


def test_append_truncates_a_conflicting_suffix_and_unstables_it() -> None:
    log = _log(5)
    log.stable_to(tuple(log.entries_from(1)))
    assert log.unstable_entries() == []
    log.append([Entry(2, 4, data=b"new")])
    assert log.last_index() == 4 and log.entry(4).data == b"new"
    assert [e.index for e in log.unstable_entries()] == [4]
    log.commit_to(3)
    with pytest.raises(RaftInvariantError):
        log.append([Entry(3, 3)])  # committed
    with pytest.raises(RaftInvariantError):
        log.append([Entry(3, 6)])  # a gap


def test_compaction_keeps_the_entries_after_the_snapshot() -> None:
    log = _log(10)
    log.commit_to(10)
    log.applied_to(6)
    log.compact(SnapshotMeta(6, 1), b"state")
    assert (log.first_index(), log.term(6), log.term(5)) == (7, 1, None)
    assert [e.index for e in log.next_committed()] == [7, 8, 9, 10]
    assert [e.index for e in log.entries_from(1)] == [7, 8, 9, 10]
    with pytest.raises(RaftInvariantError):
        log.slice(6, 8)


def test_a_compaction_may_keep_entries_the_snapshot_covers_for_a_lagging_follower() -> None:
    log = RaftLog()
    log.append([Entry(t, i, data=b"%d" % i) for i, t in enumerate([1, 1, 2, 2, 2, 3, 3, 3], 1)])
    log.commit_to(8)
    log.applied_to(7)
    log.compact(SnapshotMeta(7, 3), b"state", keep_after=3)
    assert log.snapshot.meta.index == 7 and log.first_index() == 4
    assert (log.term(3), log.term(4), log.term(2)) == (2, 2, None)  # the prev term of entry 4
    assert [e.data for e in log.slice(4, 9)] == [b"4", b"5", b"6", b"7", b"8"]
    log.compact(SnapshotMeta(7, 3), b"again", keep_after=5)  # not past the snapshot: nothing
    assert log.first_index() == 4 and log.snapshot.data == b"state"
    log.applied_to(8)
    log.compact(SnapshotMeta(8, 3), b"later", keep_after=2)  # never takes back what went
    assert (log.first_index(), log.snapshot.meta.index) == (4, 8)
    log.compact(SnapshotMeta(8, 3), b"later")
    assert log.first_index() == 4  # the snapshot at 8 was taken already
    log.append([Entry(3, 9, data=b"9")])
    log.commit_to(9)
    log.applied_to(9)
    log.compact(SnapshotMeta(9, 3), b"last")
    assert (log.first_index(), log.term(9)) == (10, 3)


def test_held_entries_do_not_add_to_what_the_garbage_collector_traverses() -> None:
    # A node holds up to 256,000 entries until a snapshot: as objects, every full
    # collection walked them all (pauses over 100 ms).
    gc.collect()
    before = len(gc.get_objects())
    log = _log(20_000)
    log.commit_to(20_000)
    log.applied_to(20_000)
    gc.collect()
    assert len(gc.get_objects()) - before < 100
    assert log.entry(20_000).data == b"x" * 10 + b"20000"


def test_entries_read_back_are_the_same_whether_recent_or_rebuilt() -> None:
    # The unapplied suffix is served from the Entry objects appended, the rest rebuilt from
    # rows: a read across the boundary, a truncation inside it and compaction agree.
    log = _log(8)
    log.commit_to(8)
    log.applied_to(5)  # drops what is applied from the recent suffix
    log.append([Entry(1, 9, data=b"9")])
    assert [(e.index, e.data) for e in log.slice(4, 10)] == [
        (i, b"x" * 10 + str(i).encode()) for i in range(4, 9)
    ] + [(9, b"9")]
    log.append([Entry(2, 9, data=b"new9"), Entry(2, 10, data=b"10")])
    assert [(e.term, e.data) for e in log.entries_from(8)] == [(1, b"x" * 10 + b"8"), (2, b"new9"), (2, b"10")]
    log.compact(SnapshotMeta(5, 1), None)
    assert [e.index for e in log.entries_from(1)] == [6, 7, 8, 9, 10]
    assert [e.index for e in log.conf_changes_from(1)] == []
