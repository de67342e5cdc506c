"""StoredShardState: the shard state machine over pykv.storage (values on disk) survives reopening."""

from __future__ import annotations

import os

from pykv.replica.shard import (
    COMMIT,
    COMMIT_DECIDE,
    DECIDE,
    FINISH,
    PREPARE,
    RELEASE,
    RESOLVER,
    ShardState,
    encode_command,
)
from pykv.replica.stored import StoredShardState, segment_bytes_for
from pykv.txn.model import ABSENT, CommitRequest, KeyRange, WriteOp
from pykv.types import OpKind


def _incr(txid: int, key: str, by: int) -> bytes:
    request = CommitRequest(txid, 1, {}, (WriteOp(key, OpKind.INCR, by),))
    return encode_command(COMMIT, None, request.to_wire())


def _put(txid: int, key: str, value) -> CommitRequest:
    return CommitRequest(txid, 1, {}, (WriteOp(key, OpKind.PUT, value),))


def test_values_metadata_and_applied_index_survive_a_reopen(tmp_path):
    state = StoredShardState(0, tmp_path / "g0")
    state.apply(1, _incr(7, "n", 5))
    state.apply(2, encode_command(RESOLVER, None, "m:", "max"))
    state.apply(3, encode_command(PREPARE, None, _put(8, "p", "x").to_wire(), 0, [0, 1]))
    state.close()

    again = StoredShardState(0, tmp_path / "g0")
    assert again.applied_index == 3
    assert again.get("n").value == 5
    assert again.resolver_names == {"m:": "max"}
    assert again.locked("p") and 8 in again.prepared
    # The remembered outcome makes a replayed (retried) commit a no-op.
    again.apply(4, _incr(7, "n", 5))
    assert again.get("n").value == 5
    again.apply(5, encode_command(FINISH, None, 8, True))
    assert again.get("p").value == "x" and not again.locked("p")
    again.close()


def test_a_node_with_more_shards_gives_each_smaller_segments_and_they_are_compacted(tmp_path):
    """A storage compacts sealed segments only, so a shard may keep about two segments of
    dead values: their size is shared out by the partition count (a node's disk does not
    grow with its shards), and overwrites stay within a few of them."""
    assert [segment_bytes_for(p) >> 20 for p in (1, 4, 16, 64, 1024)] == [64, 64, 16, 4, 4]
    state = StoredShardState(0, tmp_path / "g0", segment_bytes=64 << 10)
    latest = {}
    for i in range(400):  # 400 overwrites of 10 keys with 2 KB values: 800 KB written
        latest[f"k{i % 10}"] = os.urandom(2000)  # incompressible (zstd would shrink "vvv...")
        state.apply(i + 1, encode_command(COMMIT, None, _put(i + 1, f"k{i % 10}", latest[f"k{i % 10}"]).to_wire()))
        state.flush()  # one storage record each, as the host flushes every few ticks
    state.make_durable()
    state.store.compact()
    wal = tmp_path / "g0" / "wal"
    assert sum(f.stat().st_size for f in wal.iterdir()) < 4 * (64 << 10)
    assert all(state.get(key).value == value for key, value in latest.items())
    state.close()


def test_a_snapshot_moves_between_memory_and_disk_states(tmp_path):
    memory = ShardState(0)
    for i in range(50):
        memory.apply(i + 1, encode_command(COMMIT, None, _put(i + 1, f"k{i:02d}", i).to_wire()))
    stored = StoredShardState(0, tmp_path / "g0")
    stored.restore(memory.snapshot())
    assert stored.applied_index == 50
    assert [k for k, _ in stored.scan("k", None, None, None)] == [f"k{i:02d}" for i in range(50)]
    back = ShardState(0)
    back.restore(stored.snapshot())
    assert [(k, v.value) for k, v in back.versions.items()] == [
        (k, v.value) for k, v in memory.versions.items()
    ]
    stored.close()
    reopened = StoredShardState(0, tmp_path / "g0")
    assert reopened.get("k49").value == 49 and reopened.applied_index == 50
    assert list(reopened.outcomes) == list(memory.outcomes)  # retries stay idempotent
    reopened.destroy()
    assert not (tmp_path / "g0").exists()


def test_a_deleted_key_keeps_its_clock(tmp_path):
    state = StoredShardState(0, tmp_path / "g0")
    state.apply(1, encode_command(COMMIT, None, _put(1, "k", "a").to_wire()))
    delete = CommitRequest(2, 1, {}, (WriteOp("k", OpKind.DELETE),))
    state.apply(2, encode_command(COMMIT, None, delete.to_wire()))
    gone = state.get("k")
    assert not gone.exists and gone.clock != b""
    assert state.scan("", None, None, None) == []
    state.close()
    assert StoredShardState(0, tmp_path / "g0").get("k").clock == gone.clock


def test_applied_batches_are_written_together_and_a_crash_keeps_a_consistent_prefix(tmp_path):
    state = StoredShardState(0, tmp_path / "g0")
    state.apply(1, _incr(1, "a", 1))
    state.batch_applied()
    state.flush()  # what the host does every few ticks
    state.apply(2, _incr(2, "a", 10))
    state.apply(3, _incr(3, "b", 7))
    state.batch_applied()  # few rows: kept for a later flush, served from memory meanwhile
    assert state.get("a").value == 11 and state.get("b").value == 7
    state.store.close()  # the process dies before the next flush: those rows never left

    again = StoredShardState(0, tmp_path / "g0")
    # The storage stops at the last flush, with the applied index that says so: the Raft
    # log (never compacted past make_durable) replays entries 2 and 3 from there.
    assert again.applied_index == 1
    assert again.get("a").value == 1 and again.get("b") == ABSENT
    again.apply(2, _incr(2, "a", 10))
    again.apply(3, _incr(3, "b", 7))
    again.close()
    final = StoredShardState(0, tmp_path / "g0")
    assert final.applied_index == 3 and final.get("a").value == 11 and final.get("b").value == 7
    final.close()


def test_many_applied_rows_are_written_without_waiting_for_a_flush(tmp_path):
    state = StoredShardState(0, tmp_path / "g0")
    index = 0
    while state.applied_index < 1200:  # more rows than one flush keeps back
        index += 1
        state.apply(index, _incr(index, f"k{index}", 1))
        state.batch_applied()
    state.store.close()
    again = StoredShardState(0, tmp_path / "g0")
    assert again.applied_index >= 500  # written by batch_applied, not by close()
    again.close()


def test_a_transaction_prepared_and_finished_between_two_writes_leaves_no_record(tmp_path):
    state = StoredShardState(0, tmp_path / "g0")
    state.apply(1, encode_command(PREPARE, None, _put(8, "p", "x").to_wire(), 0, [0, 1]))
    state.apply(2, encode_command(FINISH, None, 8, True))  # same run of writes
    state.apply(3, encode_command(PREPARE, None, _put(9, "q", "y").to_wire(), 0, [0, 1]))
    state.flush()
    state.apply(4, encode_command(FINISH, None, 9, False))  # prepared in the last run
    state.apply(5, encode_command(PREPARE, None, _put(10, "r", "z").to_wire(), 0, [0, 1]))
    state.close()

    again = StoredShardState(0, tmp_path / "g0")
    assert again.applied_index == 5
    assert list(again.prepared) == [10] and again.locked("r")
    assert not again.locked("p") and not again.locked("q")
    assert again.get("p").value == "x" and again.get("q") == ABSENT
    live = [key for key, stored in again.store.scan(prefix=b"\xffp") if stored.value is not None]
    assert len(live) == 1
    again.close()


def test_unfinished_commits_survive_a_reopen_and_a_snapshot(tmp_path):
    """A coordinator's commit that a participant may not have applied yet (Unfinished) is
    never lost; one recorded and released within a run of writes leaves no record."""
    state = StoredShardState(0, tmp_path / "g0", remembered=2)
    state.apply(1, encode_command(COMMIT_DECIDE, None, _put(7, "a", 1).to_wire(), [1]))
    state.apply(2, encode_command(COMMIT_DECIDE, None, _put(8, "b", 2).to_wire(), [2, 3]))
    state.apply(3, encode_command(RELEASE, None, [8]))  # same run of writes
    state.flush()
    state.apply(4, encode_command(COMMIT_DECIDE, None, _put(9, "c", 3).to_wire(), [1]))
    state.close()

    again = StoredShardState(0, tmp_path / "g0", remembered=2)
    assert {t: u.participants for t, u in again.unfinished.items()} == {7: [1], 9: [1]}
    assert again.decision(8) is True and again.get("b").value == 2
    live = [key for key, stored in again.store.scan(prefix=b"\xffu") if stored.value is not None]
    assert len(live) == 2
    again.apply(5, encode_command(RELEASE, None, [7]))
    copy = ShardState(0)
    copy.restore(again.snapshot())
    assert list(copy.unfinished) == [9] and copy.decision(7) is True
    restored = StoredShardState(0, tmp_path / "g1")
    restored.restore(again.snapshot())
    restored.close()
    assert list(StoredShardState(0, tmp_path / "g1").unfinished) == [9]
    again.close()


def _run_rows(state: StoredShardState) -> list[bytes]:
    return [k for k, v in state.store.scan(prefix=b"\xffm") if v.value is not None]


def test_remembered_outcomes_survive_a_reopen_in_order_and_stay_bounded(tmp_path):
    state = StoredShardState(0, tmp_path / "g0", remembered=5)
    model = ShardState(0, remembered=5)
    for i in range(1, 24):
        command = _incr(1000 + i, "n", 1)
        state.apply(i, command)
        model.apply(i, command)
        if i % 3 == 0:
            state.flush()  # one run of remembered outcomes per flush
    assert list(state.outcomes) == list(model.outcomes) == [1000 + i for i in range(19, 24)]
    # Old runs are deleted once every entry in them is forgotten: about cap/run-size rows stay.
    assert len(_run_rows(state)) <= 5 // 3 + 2
    assert state.key_count() == 1  # the runs are metadata, not keys
    state.close()

    again = StoredShardState(0, tmp_path / "g0", remembered=5)
    assert list(again.outcomes) == list(model.outcomes)  # same txids, same eviction order
    again.apply(24, _incr(1023, "n", 1))  # a retry of a remembered txid is not applied again
    model.apply(24, _incr(1023, "n", 1))
    assert again.get("n").value == model.get("n").value == 23
    for i in range(25, 40):  # and it keeps forgetting exactly like a replica that never stopped
        again.apply(i, _incr(2000 + i, "n", 1))
        model.apply(i, _incr(2000 + i, "n", 1))
    assert list(again.outcomes) == list(model.outcomes)
    again.close()


def test_recorded_decisions_survive_a_reopen_and_the_first_one_stands(tmp_path):
    state = StoredShardState(0, tmp_path / "g0")
    state.apply(1, encode_command(DECIDE, None, 77, True))
    state.apply(2, encode_command(DECIDE, None, 78, False))
    state.flush()
    state.apply(3, encode_command(DECIDE, None, 77, False))  # too late: commit was recorded
    state.close()
    again = StoredShardState(0, tmp_path / "g0")
    assert dict(again.decisions) == {77: True, 78: False} and again.applied_index == 3
    again.close()


def test_what_was_forgotten_stays_refused_after_a_reopen_and_a_snapshot(tmp_path):
    state = StoredShardState(0, tmp_path / "g0", remembered=2)
    for i in range(1, 6):
        request = CommitRequest(100 + i, 1, {}, (WriteOp("n", OpKind.INCR, 1),), timestamp=10 * i)
        state.apply(i, encode_command(COMMIT, None, request.to_wire()))
        state.flush()  # the runs holding the forgotten txids are deleted from the storage
    assert state.outcomes.watermark == 30
    state.close()
    again = StoredShardState(0, tmp_path / "g0", remembered=2)
    assert again.outcomes.watermark == 30  # known only from its own row by now
    retry = CommitRequest(101, 1, {}, (WriteOp("n", OpKind.INCR, 1),), timestamp=10)
    _, outcome = again.apply(6, encode_command(COMMIT, None, retry.to_wire()))
    assert outcome[0] == "OutcomeUnknown" and again.get("n").value == 5
    copy = ShardState(0, remembered=2)
    copy.restore(again.snapshot())
    assert copy.outcomes.watermark == 30 and list(copy.outcomes) == list(again.outcomes)
    again.close()


def test_a_scan_lock_survives_a_reopen(tmp_path):
    lock = CommitRequest(9, 1, {}, (), timestamp=1, ranges=(KeyRange("u/", None, "u/m"),))
    state = StoredShardState(0, tmp_path / "g0")
    state.apply(1, encode_command(PREPARE, None, lock.to_wire(), 0, [0]))
    state.flush()
    state.close()

    again = StoredShardState(0, tmp_path / "g0")
    assert again.range_locks == {9: (KeyRange("u/", None, "u/m"),)}
    assert again.apply(2, encode_command(COMMIT, None, _put(10, "u/a", 1).to_wire()))[1][0] == "KeyLocked"
    assert again.apply(3, encode_command(COMMIT, None, _put(11, "u/z", 1).to_wire()))[1] is None
    assert again.apply(4, encode_command(FINISH, None, 9, False))[1] is None
    assert again.apply(5, encode_command(COMMIT, None, _put(10, "u/a", 1).to_wire()))[1] is None
    again.close()
