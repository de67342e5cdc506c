"""NodeLog: many groups' Raft logs in one WAL, recovered exactly as persisted."""

from __future__ import annotations

import random

import pytest

from pykv.errors import CorruptData
from pykv.raft.messages import ConfState, Entry, HardState, Snapshot, SnapshotMeta
from pykv.replica.durable import GroupWork, NodeLog, SnapshotFile, image_file, snapshot_data


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


@pytest.mark.parametrize("loss", ["directory", "segments"])
def test_snapshots_without_their_wal_are_refused_not_restarted_with_no_vote(tmp_path, loss):
    """A node whose WAL is gone (deleted, or a disk replaced under it) while its snapshot
    files survived forgot its terms, votes and acknowledged entries: restarting its groups
    from the snapshots alone would let it vote twice in a term, so recovery refuses."""
    import shutil

    log = NodeLog(tmp_path)
    log.persist([GroupWork(1, HardState(4, 2, 6), _entries(4, 1, 6), None)])
    log.save_snapshot(1, Snapshot(SnapshotMeta(5, 4), b"state@5"))
    log.close()
    if loss == "directory":
        shutil.rmtree(tmp_path / "wal")
    else:
        for segment in (tmp_path / "wal").iterdir():
            segment.unlink()
    with pytest.raises(CorruptData, match="lost its Raft log"):
        NodeLog(tmp_path)


def test_a_snapshot_the_wal_records_but_the_disk_lost_is_refused(tmp_path):
    """The entries before the marker are gone from the WAL: without the file the group
    would restart from an empty log and forget entries it acknowledged."""
    log = NodeLog(tmp_path)
    log.persist([GroupWork(1, HardState(2, 1, 6), _entries(2, 1, 6), None)])
    log.persist([GroupWork(1, None, (), Snapshot(SnapshotMeta(4, 2), b"state@4"))])
    log.persist([GroupWork(1, HardState(2, 1, 8), _entries(2, 7, 8), None)])
    log.close()
    assert NodeLog(tmp_path).persistent_state(1).snapshot.meta.index == 4
    (tmp_path / "snap" / "g1.snap").unlink()
    with pytest.raises(CorruptData, match="g1.snap should hold the snapshot of group 1 at index 4"):
        NodeLog(tmp_path)


def test_a_new_node_and_one_whose_groups_were_all_dropped_start_without_a_wal(tmp_path):
    NodeLog(tmp_path / "new").close()  # nothing on disk: a first start
    log = NodeLog(tmp_path / "left")
    log.persist([GroupWork(2, HardState(3, 1, 2), _entries(3, 1, 2), None)])
    log.save_snapshot(2, Snapshot(SnapshotMeta(1, 3), b"old"))
    log.drop(2)
    log.close()
    again = NodeLog(tmp_path / "left")
    assert again.groups() == []
    again.close()


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
    (tmp_path / "snap" / "g1.snap").unlink()  # its marker's record was deleted; restated since
    with pytest.raises(CorruptData, match="group 1 at index 70, which the WAL records"):
        NodeLog(tmp_path)


def test_a_snapshot_image_streams_into_its_file_and_out_again(tmp_path):
    import os

    image = os.urandom(3 << 20)

    class Received:  # a handle to an image in a file of its own (pykv.server.snapshots)
        def __init__(self, path):
            self.path = path

        def open(self):
            return open(self.path, "rb")

    source = tmp_path / "incoming.img"
    source.write_bytes(image)
    log = NodeLog(tmp_path / "node")
    meta = SnapshotMeta(7, 2, ConfState(frozenset({1, 2, 3})))
    handle = log.save_snapshot(1, Snapshot(meta, Received(source)))
    with handle.open() as f:
        assert f.read(4) == image[:4]  # positioned where the image starts
    assert handle.load() == image
    log.save_snapshot(2, Snapshot(meta, None))  # a shard whose storage is the snapshot
    assert log.snapshot_file(2, 7).open() is None and log.snapshot_file(2, 7).load() is None
    log.persist([GroupWork(1, HardState(2, 1, 7), (), None)])  # the group's WAL record
    log.close()
    recovered = NodeLog(tmp_path / "node").persistent_state(1).snapshot
    assert recovered.meta == meta and snapshot_data(recovered.data) == image
    with pytest.raises(CorruptData, match="no longer holds the snapshot at index 9"):
        SnapshotFile(handle.path, 9).open()


def test_a_received_image_becomes_the_snapshot_file_without_a_copy(tmp_path):
    import os

    from pykv.server.snapshots import ReceivedImage

    image = os.urandom(1 << 20)
    with image_file(tmp_path / "incoming.img") as f:
        f.write(image)
    received = ReceivedImage(tmp_path / "incoming.img")
    log = NodeLog(tmp_path / "node")
    meta = SnapshotMeta(7, 2, ConfState(frozenset({1, 2, 3})))
    handle = log.save_snapshot(1, Snapshot(meta, received))
    assert os.stat(handle.path).st_ino == os.stat(received.path).st_ino  # linked, not copied
    assert handle.load() == received.load() == image
    del received  # restored: the receiver's name for it goes, the snapshot file stays
    assert not (tmp_path / "incoming.img").exists() and handle.load() == image
    log.persist([GroupWork(1, HardState(2, 1, 7), (), None)])  # the group's WAL record
    log.close()
    recovered = NodeLog(tmp_path / "node").persistent_state(1).snapshot
    assert recovered.meta == meta and snapshot_data(recovered.data) == image
    # A header too big for the room (a configuration of thousands of nodes): copied instead.
    many = SnapshotMeta(8, 2, ConfState(frozenset(range(1, 20_000))))
    with image_file(tmp_path / "again.img") as f:
        f.write(image)
    handle = NodeLog(tmp_path / "node2").save_snapshot(1, Snapshot(many, ReceivedImage(tmp_path / "again.img")))
    assert handle.load() == image and os.stat(handle.path).st_nlink == 1


def test_a_snapshot_file_of_an_earlier_release_is_still_read(tmp_path):
    from pykv.codec import pack

    meta = SnapshotMeta(4, 1, ConfState(frozenset({1})))
    log = NodeLog(tmp_path)  # the group's WAL record
    log.persist([GroupWork(3, HardState(1, 1, 4), (), None)])
    log.close()
    (tmp_path / "snap" / "g3.snap").write_bytes(pack([meta.to_wire(), b"old image", 0]))  # one object
    state = NodeLog(tmp_path).persistent_state(3)
    assert state.snapshot.meta == meta and snapshot_data(state.snapshot.data) == b"old image"
    with state.snapshot.data.open() as f:
        assert f.read() == b"old image"


@pytest.mark.parametrize("seed", range(4))
def test_replay_of_many_overwrites_and_snapshots_matches_the_persisted_log(tmp_path, seed):
    """Records that append, overwrite a suffix from anywhere (new leaders), or snapshot,
    read back as the log the group persisted last: the same entries, term for term."""
    rng = random.Random(seed)
    log = NodeLog(tmp_path)
    expected: list[Entry] = []  # the group's log as persisted
    snapshot_index = 0
    for term in range(1, 300):
        last = expected[-1].index if expected else snapshot_index
        if rng.random() < 0.05 and last > snapshot_index:
            index = rng.randint(snapshot_index + 1, last)
            snap = Snapshot(SnapshotMeta(index, term, ConfState(frozenset({1, 2, 3}))), b"s")
            log.persist([GroupWork(1, None, (), snap)])
            expected = [e for e in expected if e.index > index]
            snapshot_index = index
            continue
        first = rng.randint(snapshot_index + 1, last + 1) if rng.random() < 0.3 else last + 1
        entries = _entries(term, first, first + rng.randrange(1, 5), f"t{term}-")
        log.persist([GroupWork(1, HardState(term, 1, 0), entries, None)])
        expected = [e for e in expected if e.index < first] + list(entries)
    log.close()
    state = NodeLog(tmp_path).persistent_state(1)
    assert state.snapshot.meta.index == snapshot_index
    assert [(e.index, e.term, e.data) for e in state.entries] == [
        (e.index, e.term, e.data) for e in expected
    ]
