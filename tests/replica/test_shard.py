"""The shard state machine: commits, 2PC locks and decisions, retries by txid, snapshots."""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykv._engine.vclock import BEFORE, VClock
from pykv.codec import pack
from pykv.replica.shard import (
    COMMIT,
    COMMIT_DECIDE,
    DECIDE,
    FINISH,
    LOAD,
    MIN_REMEMBERED,
    PREPARE,
    RELEASE,
    REMEMBERED_PER_NODE,
    RESOLVER,
    WIPE,
    Remembered,
    ShardState,
    encode_command,
    remembered_per_shard,
    scan_reply,
)
from pykv.replica.stored import StoredShardState
from pykv.txn.model import (
    MISSING,
    CommitRequest,
    Isolation,
    KeyRange,
    KeyUpdate,
    Versioned,
    WriteOp,
    item_bytes,
)
from pykv.types import OpKind


class Log:
    """Feeds commands to a ShardState at increasing log indexes, like Raft's apply loop."""

    def __init__(self, state: ShardState | None = None) -> None:
        self.state = state or ShardState(0)
        self.index = 0

    def run(self, tag: str, *args):
        self.index += 1
        _, result = self.state.apply(self.index, encode_command(tag, None, *args))
        return result


def put(txid: int, key: str, value, observed: Versioned | None = None) -> CommitRequest:
    return CommitRequest(txid, 1, {}, (WriteOp(key, OpKind.PUT, value, observed),))


def incr(txid: int, key: str, by: int = 1) -> CommitRequest:
    return CommitRequest(txid, 1, {}, (WriteOp(key, OpKind.INCR, by, None),))


def test_a_retried_commit_returns_its_first_outcome_and_applies_once():
    log = Log()
    assert log.run(COMMIT, incr(7, "n", 5).to_wire()) is None
    assert log.run(COMMIT, incr(7, "n", 5).to_wire()) is None  # the retry
    assert log.state.get("n").value == 5


def test_a_shard_remembers_its_share_of_the_nodes_budget_and_forgets_the_oldest():
    # However many partitions, a node (which hosts at most all of them) remembers at most
    # one budget of txids per table, down to a floor per shard.
    for partitions in (1, 3, 16, 128, 4096):
        share = remembered_per_shard(partitions)
        assert share * partitions <= max(REMEMBERED_PER_NODE, MIN_REMEMBERED * partitions)
    assert remembered_per_shard(16) == REMEMBERED_PER_NODE // 16
    log = Log(ShardState(0, remembered=3))
    for txid in range(1, 6):
        assert log.run(COMMIT, incr(txid, "n").to_wire()) is None
    assert list(log.state.outcomes) == [3, 4, 5]
    assert log.run(COMMIT, incr(5, "n").to_wire()) is None  # remembered: not applied again
    assert log.state.get("n").value == 5


def test_a_retry_of_a_forgotten_transaction_is_refused_never_applied_twice():
    log = Log(ShardState(0, remembered=2))
    for txid in range(1, 5):  # txids 1 and 2 are forgotten, the newest forgotten at time 20
        request = dataclasses.replace(incr(txid, "n"), timestamp=10 * txid)
        assert log.run(COMMIT, request.to_wire()) is None
    assert list(log.state.outcomes) == [3, 4] and log.state.outcomes.watermark == 20
    retry = dataclasses.replace(incr(1, "n"), timestamp=10)
    outcome = log.run(COMMIT, retry.to_wire())
    assert outcome[0] == "OutcomeUnknown" and "unknown" in outcome[1]  # the client: outcome unknown
    assert log.state.get("n").value == 4  # not applied a second time
    assert log.run(COMMIT, dataclasses.replace(incr(5, "n"), timestamp=50).to_wire()) is None


def test_a_coordinator_keeps_a_commit_until_every_participant_finished_it():
    """A participant still prepared always finds its decision, however many transactions
    the coordinator shard has decided since: a commit is never forgotten before RELEASE,
    and nothing recorded therefore means abort, even for a very old transaction."""
    log = Log(ShardState(0, remembered=1))
    committed = dataclasses.replace(put(7, "k", "v"), timestamp=70)
    assert log.run(COMMIT_DECIDE, committed.to_wire(), [1, 2]) is None
    assert 7 in log.state.unfinished and 7 not in log.state.decisions
    for txid in (8, 9):  # abort decisions rotate the table (remembered=1): 8 is forgotten
        assert log.run(DECIDE, txid, False, 10 * txid) is False
    assert 8 not in log.state.decisions and log.state.decisions.forgot(80)
    assert log.run(DECIDE, 7, False, 70) is True  # participant 1 gave up waiting: commit
    assert log.run(DECIDE, 8, False, 80) is False  # forgotten abort: still abort, not a guess
    assert log.run(RELEASE, [7]) is None  # both participants applied it
    assert 7 not in log.state.unfinished and log.state.decisions.get(7) is True
    assert log.run(DECIDE, 10, False, 100) is False  # 7 is forgotten now, like any decision
    assert 7 not in log.state.decisions and log.state.decisions.forgot(70)
    # A late retry of its commit is refused (the watermark), never applied again.
    assert log.run(COMMIT_DECIDE, committed.to_wire(), [1, 2])[0] == "OutcomeUnknown"
    assert log.state.get("k").value == "v"
    # A COMMIT_DECIDE may carry the txids to release (no command of their own).
    later = [dataclasses.replace(put(t, "k", t), timestamp=10 * t).to_wire() for t in (11, 12)]
    assert log.run(COMMIT_DECIDE, later[0], [1]) is None
    assert log.run(COMMIT_DECIDE, later[1], [2], [11]) is None
    assert list(log.state.unfinished) == [12] and log.state.decision(11) is True


def test_a_conflicting_commit_is_refused_with_the_validation_error():
    log = Log()
    log.run(COMMIT, put(1, "k", "a").to_wire())
    seen = log.state.get("k")
    log.run(COMMIT, put(2, "k", "b").to_wire())
    outcome = log.run(COMMIT, put(3, "k", "c", observed=seen).to_wire())
    assert outcome[0] == "TransactionConflict"
    assert log.state.get("k").value == "b"


def test_prepared_keys_are_locked_until_finish():
    log = Log()
    assert log.run(PREPARE, put(10, "k", "new").to_wire(), 1, [0, 1]) is None
    assert log.state.locked("k")
    assert log.state.get("k").exists is False  # not applied yet
    assert log.run(COMMIT, put(11, "k", "other").to_wire())[0] == "KeyLocked"
    assert log.run(FINISH, 10, True) is None
    assert not log.state.locked("k")
    assert log.state.get("k").value == "new"
    # Refused on a lock, nothing was remembered: the same commit, sent again, goes through.
    assert log.run(COMMIT, put(11, "k", "later").to_wire()) is None
    assert log.state.get("k").value == "later"


def test_an_aborted_prepare_applies_nothing_and_a_late_prepare_votes_no():
    log = Log()
    log.run(PREPARE, put(20, "k", "x").to_wire(), 1, [0, 1])
    assert log.run(FINISH, 20, False)[0] == "TransactionConflict"
    assert log.state.get("k").exists is False
    assert not log.state.locked("k")
    # A FINISH(abort) that arrives before the prepare: the prepare must not vote yes later.
    log.run(FINISH, 21, False)
    assert log.run(PREPARE, put(21, "j", "x").to_wire(), 1, [0, 1]) is not None
    assert not log.state.locked("j")


def test_the_first_decision_recorded_wins():
    log = Log()
    assert log.run(DECIDE, 30, False) is False
    assert log.run(DECIDE, 30, True) is False
    # The coordinator's own part arriving after a participant recorded abort is refused.
    outcome = log.run(COMMIT_DECIDE, put(30, "c", 1).to_wire())
    assert outcome[0] == "TransactionConflict"
    assert log.state.get("c").exists is False
    # Commit first: a later abort request gets commit back.
    assert log.run(COMMIT_DECIDE, put(31, "c", 2).to_wire()) is None
    assert log.run(DECIDE, 31, False) is True
    assert log.state.get("c").value == 2


def test_a_coordinator_part_refused_on_a_lock_records_no_decision():
    log = Log()
    assert log.run(PREPARE, put(50, "k", "first").to_wire(), 1, [0, 1]) is None
    # Transaction 51 coordinates on this shard and needs "k": refused, nothing recorded.
    assert log.run(COMMIT_DECIDE, put(51, "k", "second").to_wire(), [1])[0] == "KeyLocked"
    assert log.state.decision(51) is None and 51 not in log.state.outcomes
    assert log.run(FINISH, 50, True) is None
    assert log.run(COMMIT_DECIDE, put(51, "k", "second").to_wire(), [1]) is None  # sent again
    assert log.state.decision(51) is True and log.state.get("k").value == "second"


def test_blind_increments_share_their_locks_and_both_count():
    log = Log()
    assert log.run(PREPARE, incr(40, "n", 1).to_wire(), 1, [0, 1]) is None
    assert log.run(PREPARE, incr(41, "n", 10).to_wire(), 1, [0, 1]) is None
    assert log.run(COMMIT, incr(42, "n", 100).to_wire()) is None  # commutes too
    # A plain put must wait for both prepared increments.
    assert log.run(COMMIT, put(43, "n", 0).to_wire())[0] == "KeyLocked"
    log.run(FINISH, 41, True)
    log.run(FINISH, 40, True)
    assert log.state.get("n").value == 111
    assert not log.state.locked("n")


def test_resolvers_registered_through_the_log_apply_in_merge_isolation():
    log = Log()
    assert log.run(RESOLVER, "m:", "max") is None
    log.run(COMMIT, put(50, "m:x", 5).to_wire())
    seen = log.state.get("m:x")
    log.run(COMMIT, put(51, "m:x", 9).to_wire())
    merge = CommitRequest(52, 1, {}, (WriteOp("m:x", OpKind.PUT, 7, seen),), Isolation.MERGE)
    assert log.run(COMMIT, merge.to_wire()) is None
    assert log.state.get("m:x").value == 9
    assert log.run(RESOLVER, "m:", None) is None  # unregister
    assert log.state.resolver_names == {}


def test_snapshot_restores_everything_including_prepared_locks():
    log = Log()
    log.run(RESOLVER, "m:", "max")
    log.run(COMMIT, put(60, "a", [1, "x", b"y"]).to_wire())
    log.run(PREPARE, put(61, "b", 2).to_wire(), 3, [0, 3])
    log.run(DECIDE, 62, True)
    copy = ShardState(0)
    copy.restore(log.state.snapshot())
    assert copy.snapshot() == log.state.snapshot()
    assert copy.locked("b") and copy.prepared[61].coordinator_shard == 3
    again = Log(copy)
    again.index = log.index
    assert again.run(FINISH, 61, True) is None
    assert copy.get("b").value == 2
    assert again.run(COMMIT, put(60, "a", "retry").to_wire()) is None  # outcome remembered
    assert copy.get("a").value == [1, "x", b"y"]


def test_wipe_forgets_keys_resolvers_and_outcomes():
    log = Log()
    log.run(RESOLVER, "m:", "max")
    log.run(COMMIT, put(70, "a", 1).to_wire())
    assert log.run(WIPE) is None
    assert log.state.get("a").clock == b"" and log.state.resolver_names == {}
    assert log.run(COMMIT, put(70, "a", 2).to_wire()) is None  # the id is forgotten too
    assert log.state.get("a").value == 2


def test_scan_skips_tombstones_and_respects_bounds():
    log = Log()
    for i, key in enumerate(["p/a", "p/b", "p/c", "q/a"]):
        log.run(COMMIT, put(80 + i, key, i).to_wire())
    log.run(COMMIT, CommitRequest(90, 1, {}, (WriteOp("p/b", OpKind.DELETE),)).to_wire())
    assert [k for k, _ in log.state.scan("p/", None, None, None)] == ["p/a", "p/c"]
    assert [k for k, _ in log.state.scan("", "p/b", "q/b", None)] == ["p/c", "q/a"]
    assert [k for k, _ in log.state.scan("", None, None, 1)] == ["p/a"]


@pytest.mark.parametrize("stored", [False, True], ids=["memory", "stored"])
def test_a_scan_comes_in_pages_that_cover_the_range_once(tmp_path, stored):
    """A SCAN with a page size answers about that many bytes and where to go on (the next
    key), so no reply grows with the range; a value bigger than a page still comes, alone."""
    log = Log(StoredShardState(0, tmp_path / "s") if stored else ShardState(0))
    keys = [f"p/{i:02d}" for i in range(40)]
    for i, key in enumerate(keys):
        log.run(COMMIT, put(100 + i, key, "x" * 50 if key != "p/07" else "y" * 5000).to_wire())
    log.run(COMMIT, CommitRequest(99, 1, {}, (WriteOp("p/03", OpKind.DELETE),)).to_wire())
    log.run(COMMIT, put(98, "q/00", 1).to_wire())
    pages, start = [], None
    while True:
        items, start = scan_reply(log.state, ["p/", start, None, None, True, 300], 1 << 20)
        pages.append([(k, Versioned.from_wire(v)) for k, v in items])
        if start is None:
            break
    assert [k for page in pages for k, _ in page] == keys  # every key once, p/03's tombstone too
    for page in pages:  # each ends at the item that takes it to 300 bytes (the last: at the end)
        sizes = [item_bytes(item) for item in page]
        assert page and sum(sizes[:-1]) < 300 and (page is pages[-1] or sum(sizes) >= 300)
    assert any(page[-1][0] == "p/07" for page in pages)  # 5 KB: it ends its page
    # Tombstones left out, a limit of live keys across pages, and the node's own cap.
    items, start = scan_reply(log.state, ["p/", "p/02", None, 3, False, 1 << 20], 1 << 20)
    assert [k for k, _ in items] == ["p/02", "p/04", "p/05"] and start is None
    items, start = scan_reply(log.state, ["p/", None, None, None, False, 1 << 20], 300)
    capped = [item_bytes((k, Versioned.from_wire(v))) for k, v in items]
    assert sum(capped[:-1]) < 300 <= sum(capped) and start is not None
    # Without a page size, the reply of clients before pages: every item, as a plain list.
    every = scan_reply(log.state, ["p/", None, "p/10", None, False, None], 300)
    assert [k for k, _ in every] == [k for k in keys[:10] if k != "p/03"]


def test_a_retried_prepare_restarts_its_recovery_wait():
    """A consistent scan renews its range lock by PREPAREing it again: each replica's
    clock for recovery (Prepared.since) then starts over."""
    log = Log()
    now = [10.0]
    log.state.clock = lambda: now[0]
    assert log.run(PREPARE, scan_lock(1, "u/").to_wire(), 0, [0]) is None
    now[0] = 12.5
    assert log.run(PREPARE, scan_lock(1, "u/").to_wire(), 0, [0]) is None
    assert log.state.prepared[1].since == 12.5


_KEYS = ["a", "b", "c"]


@st.composite
def commands(draw):
    out = []
    for txid in range(1, draw(st.integers(1, 25))):
        key = draw(st.sampled_from(_KEYS))
        kind = draw(st.sampled_from(
            ["commit", "incr", "prepare", "finish", "decide", "coordinate", "release", "scan lock"]
        ))
        if kind == "commit":
            out.append((COMMIT, put(txid, key, txid).to_wire()))
        elif kind == "incr":
            out.append((COMMIT, incr(txid, key).to_wire()))
        elif kind == "prepare":
            out.append((PREPARE, incr(txid, key).to_wire(), 0, [0, 1]))
        elif kind == "finish":
            out.append((FINISH, draw(st.integers(1, txid)), draw(st.booleans())))
        elif kind == "coordinate":
            released = [draw(st.integers(1, txid))] if draw(st.booleans()) else []
            out.append((COMMIT_DECIDE, put(txid, key, txid).to_wire(), [1], *([released] if released else [])))
        elif kind == "release":
            out.append((RELEASE, [draw(st.integers(1, txid))]))
        elif kind == "scan lock":
            out.append((PREPARE, scan_lock(txid, key[:1]).to_wire(), 0, [0]))
        else:
            out.append((DECIDE, draw(st.integers(1, txid)), draw(st.booleans())))
    return out


@settings(deadline=None, max_examples=40)
@given(commands(), st.integers(0, 1000))
def test_replicas_applying_the_same_log_end_in_the_same_state(cmds, seed):
    """Determinism: what every replica relies on. Two replicas, same log, same bytes; and a
    replica restored from a snapshot taken midway ends in the same state too."""
    first, second = Log(), Log()
    cut = random.Random(seed).randrange(len(cmds) + 1)
    for i, cmd in enumerate(cmds):
        assert first.run(*cmd) == second.run(*cmd)
        if i + 1 == cut:
            restored = ShardState(0)
            restored.restore(second.state.snapshot())
            second = Log(restored)
            second.index = first.index
    assert pack(first.state.snapshot()) == pack(second.state.snapshot())


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6), st.lists(st.integers(1, 1_000), max_size=40))
def test_remembered_keeps_the_newest_and_the_highest_forgotten_timestamp(cap, stamps):
    table = Remembered(cap)
    for txid, stamp in enumerate(stamps):
        table.add(txid, f"outcome {txid}", stamp)
    kept = list(range(len(stamps)))[-cap:]
    assert list(table) == kept and [table[t] for t in kept] == [f"outcome {t}" for t in kept]
    assert table.entries() == [[t, f"outcome {t}", stamps[t]] for t in kept]  # a snapshot's
    forgotten = stamps[:max(0, len(stamps) - cap)]
    assert table.watermark == max(forgotten, default=0)
    # Every forgotten txid's own request would be refused; nothing is while none is forgotten.
    assert all(table.forgot(s) for s in forgotten)
    assert forgotten or not any(table.forgot(s) for s in range(0, 1_001))


def test_remembered_tables_hold_nothing_the_garbage_collector_walks():
    # A node remembers a million txids: as tracked objects, every full collection walked
    # them (35 ms of a pause). Error outcomes are lists, but come back equal.
    import gc

    outcomes, decisions = Remembered(1_000), Remembered(1_000)
    for txid in range(2_500):  # past the cap: the ring wraps twice
        error = ["TransactionConflict", f"transaction {txid} was aborted"]
        outcomes.add(txid, None if txid % 3 else error, txid)
        decisions.add(txid, txid % 2 == 0, txid)
    gc.collect()
    gc.collect()
    assert not gc.is_tracked(outcomes._table) and not gc.is_tracked(decisions._table)
    assert outcomes[2_498] is None and outcomes.get(2_496) == ["TransactionConflict", "transaction 2496 was aborted"]
    assert decisions.get(2_498) is True and decisions.get(2_499) is False and decisions.get(1_499) is None
    assert [e[0] for e in outcomes.entries()] == list(range(1_500, 2_500))
    assert outcomes.watermark == 1_499 and 3 not in outcomes


def test_an_image_streams_in_runs_and_a_cut_or_old_one_is_handled():
    import io

    from pykv.codec import unpack_stream
    from pykv.errors import CorruptData
    from pykv.replica.shard import IMAGE_RUN

    log = Log()
    keys = 2 * IMAGE_RUN + 5
    for i in range(0, keys, 50):
        log.run(COMMIT, CommitRequest(
            100 + i, 1, {}, tuple(WriteOp(f"k{j:05d}", OpKind.PUT, j) for j in range(i, min(keys, i + 50)))
        ).to_wire())
    log.run(PREPARE, put(99_000, "locked", 1).to_wire(), 3, [0, 3])
    image = log.state.snapshot()
    objects = list(unpack_stream(io.BytesIO(image)))
    # a header, runs of at most IMAGE_RUN versions, a trailer that counts them
    assert [len(o) for o in objects[1:-1]] == [IMAGE_RUN, IMAGE_RUN, 5]
    assert objects[-1] == ["end", keys]

    copy = ShardState(0)
    copy.restore(io.BytesIO(image))  # from a file, a run at a time
    assert copy.snapshot() == image and copy.locked("locked")

    for cut in (len(image) - 3, len(image) // 2):
        with pytest.raises(CorruptData, match="without its trailer"):
            ShardState(0).restore(io.BytesIO(image[:cut]))

    # An image of an earlier release: one object, its versions inside.
    header = objects[0]
    old = {k: v for k, v in header.items() if k != "format"}
    old["versions"] = [pair for run in objects[1:-1] for pair in run]
    older = ShardState(0)
    older.restore(pack(old))
    assert older.snapshot() == image


def test_the_metadata_group_snapshots_and_restores_its_shard_map():
    import io

    from pykv.cluster.shardmap import ShardMap
    from pykv.replica.meta import SET_MAP, MetaState

    founding = ShardMap(version=1, nodes=(1, 2, 3), addresses={}, partitions=8, vnodes=4, replicas=3)
    grown = ShardMap(version=2, nodes=(1, 2, 3, 4), addresses={}, partitions=8, vnodes=4, replicas=3)
    state = MetaState(1 << 20)
    state.apply(1, encode_command(SET_MAP, None, founding.encode()))
    state.apply(2, encode_command(SET_MAP, None, grown.encode()))
    image = state.snapshot()
    assert image == b"".join(state.snapshot_parts())
    for source in (image, io.BytesIO(image)):  # bytes, or a file to stream (InstallSnapshot)
        copy = MetaState(1 << 20)
        copy.restore(source)
        assert copy.shard_map == grown and copy.applied_index == 2


@pytest.mark.parametrize("stored", [False, True])
def test_an_image_made_between_commits_is_the_state_when_it_began(tmp_path, monkeypatch, stored):
    from pykv.replica import shard as shard_module

    monkeypatch.setattr(shard_module, "IMAGE_RUN", 3)  # many parts, commands between them
    for seed in range(25):
        rng = random.Random(seed)
        state = (StoredShardState(0, tmp_path / f"s{seed}") if stored else ShardState(0))
        log = Log(state)
        txid = 1000
        names = [f"k{i:03d}" for i in range(0, 80, 2)]
        for name in names:
            txid += 1
            log.run(COMMIT, put(txid, name, rng.randrange(100)).to_wire())
        expected = state.snapshot()
        parts = state.snapshot_parts()
        image = [next(parts)]
        for part in parts:
            image.append(part)
            for _ in range(rng.randrange(4)):  # writes land before and behind the image
                txid += 1
                key = f"k{rng.randrange(90):03d}"  # odd ones are new keys
                if rng.random() < 0.25:
                    op = WriteOp(key, OpKind.DELETE)
                else:
                    op = WriteOp(key, OpKind.PUT, rng.randrange(1000))
                log.run(COMMIT, CommitRequest(txid, 1, {}, (op,)).to_wire())
                state.flush()  # into the storage the image is walking (stored)
        assert b"".join(image) == expected, f"seed {seed}"
        if stored:
            state.close()


def test_an_image_under_way_is_abandoned_when_the_state_is_replaced():
    from pykv.errors import CorruptData
    from pykv.replica import shard as shard_module

    log = Log()
    for i in range(10):
        log.run(COMMIT, put(2000 + i, f"w{i}", i).to_wire())
    original = shard_module.IMAGE_RUN
    shard_module.IMAGE_RUN = 2
    try:
        parts = log.state.snapshot_parts()
        next(parts), next(parts)
        assert log.run(WIPE) is None
        with pytest.raises(CorruptData, match="replaced while it was imaged"):
            list(parts)
        assert log.state.snapshot_parts() is not None and next(log.state.snapshot_parts())
    finally:
        shard_module.IMAGE_RUN = original


def scan_lock(txid: int, prefix: str, start: str | None = None, end: str | None = None) -> CommitRequest:
    return CommitRequest(txid, 1, {}, (), timestamp=1, ranges=(KeyRange(prefix, start, end),))


def test_a_scan_lock_keeps_writers_out_of_its_range_until_released():
    log = Log()
    log.run(COMMIT, put(1, "u/a", 1).to_wire())
    assert log.run(PREPARE, scan_lock(2, "u/", None, "u/b").to_wire(), 0, [0]) is None
    assert not log.state.locked("u/a")  # it locks no key: reads go on
    refused = log.run(COMMIT, put(3, "u/a", 2).to_wire())
    assert refused[0] == "KeyLocked" and "consistent scan" in refused[1]
    assert log.run(PREPARE, put(4, "u/a", 2).to_wire(), 1, [0, 1])[0] == "KeyLocked"
    # Outside the range (past its end, or another prefix), writes go on.
    assert log.run(COMMIT, put(5, "u/b", 1).to_wire()) is None
    assert log.run(COMMIT, put(6, "v/a", 1).to_wire()) is None
    # Released by its scanner while held: None, and a retried release says the same.
    assert log.run(FINISH, 2, False) is None
    assert log.run(FINISH, 2, False) is None
    assert log.run(COMMIT, put(3, "u/a", 2).to_wire()) is None  # refused on a lock: not remembered
    assert log.state.get("u/a").value == 2


def test_a_scan_waits_for_writers_prepared_in_its_range_and_only_those():
    log = Log()
    log.run(PREPARE, put(1, "u/a", 1).to_wire(), 1, [0, 1])
    log.run(PREPARE, put(2, "v/a", 1).to_wire(), 1, [0, 1])
    assert log.state.range_locked(KeyRange("u/")) and log.state.range_locked(KeyRange(""))
    assert log.state.range_locked(KeyRange("u/", None, "u/b"))  # u/a is in [u/, u/b)
    assert not log.state.range_locked(KeyRange("u/", "u/b"))  # [u/b, ...)
    assert not log.state.range_locked(KeyRange("w/"))
    # A scan lock is granted over a prepared writer (which may still finish); no new one.
    assert log.run(PREPARE, scan_lock(3, "u/").to_wire(), 0, [0]) is None
    log.run(FINISH, 1, True)
    assert not log.state.range_locked(KeyRange("u/"))
    assert log.state.get("u/a").value == 1


def test_a_scan_lock_that_recovery_released_is_reported_lost():
    log = Log()
    log.run(PREPARE, scan_lock(1, "u/").to_wire(), 0, [0])
    # Recovery (the scanner looked gone): abort recorded on the lock's own shard, then FINISH.
    assert log.run(DECIDE, 1, False) is False
    assert log.run(FINISH, 1, False)[0] == "TransactionConflict"
    # The scanner's own release, later, learns that the lock went before it: not None.
    assert log.run(FINISH, 1, False)[0] == "TransactionConflict"
    assert log.run(COMMIT, put(2, "u/a", 1).to_wire()) is None


def test_a_scan_lock_travels_in_snapshots():
    log = Log()
    log.run(PREPARE, scan_lock(1, "u/").to_wire(), 0, [0])
    copy = ShardState(0)
    copy.restore(log.state.snapshot())
    assert copy.range_locks == {1: (KeyRange("u/"),)}
    again = Log(copy)
    again.index = log.index
    assert again.run(COMMIT, put(2, "u/a", 1).to_wire())[0] == "KeyLocked"
    assert again.run(FINISH, 1, False) is None
    assert copy.range_locks == {}


@pytest.mark.parametrize("stored", [False, True])
def test_a_load_keeps_clocks_of_new_keys_and_gives_held_keys_a_clock_after_both(stored, tmp_path):
    """LOAD (pykv restore) stores versions made elsewhere: a key the shard has no version of
    gets the loaded one as it is (a client's context from before the backup still matches);
    a key it holds gets the value with a clock after both, so no context matches it; the
    same load again changes nothing (an overwritten key included); a key a prepared
    transaction holds refuses the whole load, nothing of it stored."""
    log = Log(StoredShardState(0, tmp_path / "s") if stored else ShardState(0))
    backed_up = VClock({7: 3, 9: 1}).encode()
    assert log.run(COMMIT, put(1, "held", "cluster's").to_wire()) is None
    held = log.state.get("held")
    load = [KeyUpdate("fresh", [b"x", 1], backed_up, 1234).to_wire(),
            KeyUpdate("held", "backup's", backed_up, 1235).to_wire()]
    assert log.run(LOAD, load, 2) is None
    assert log.state.get("fresh") == Versioned([b"x", 1], backed_up, 1234)
    loaded = log.state.get("held")
    assert loaded.value == "backup's" and loaded.timestamp == 1235
    after = VClock.decode(loaded.clock)
    for before in (VClock.decode(held.clock), VClock.decode(backed_up)):
        assert before.compare(after) == BEFORE
    assert log.run(LOAD, load, 2) is None  # a retry: both keys already hold what it loads
    assert log.state.get("fresh").clock == backed_up and log.state.get("held") == loaded
    assert log.run(PREPARE, put(5, "fresh", "locked").to_wire(), 0, [0, 1]) is None
    refused = log.run(LOAD, [KeyUpdate("other", 1, backed_up, 1).to_wire(), load[0]], 2)
    assert refused[0] == "KeyLocked"
    assert log.state.get("other").value is MISSING
