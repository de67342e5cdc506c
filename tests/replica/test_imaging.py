"""A backup's export of a shard (pykv.replica.imaging): one moment's live keys, a page at a
time, while the shard goes on committing."""

from __future__ import annotations

import random

import pytest
from replica.test_shard import Log, put

from pykv.errors import InvalidOperation, TransactionConflict
from pykv.replica import imaging
from pykv.replica.shard import COMMIT, WIPE, ShardState
from pykv.replica.stored import StoredShardState
from pykv.txn.model import CommitRequest, Versioned, WriteOp
from pykv.types import OpKind


def _live(state: ShardState) -> dict[str, Versioned]:
    state.flush()
    return {k: v for k, v in state._all_versions() if v.exists}


def _export_all(state: ShardState, export_id: int, page_bytes: int, between=lambda: None) -> dict:
    """Every page of a new export, running ``between()`` after each page."""
    got: dict[str, Versioned] = {}
    page, more = state.begin_export(export_id, page_bytes)
    number = 0
    while True:
        for key, wire in page:
            assert key not in got, "a key came twice"
            got[key] = Versioned.from_wire(wire)
        if not more:
            return got
        between()
        page, more = state.export_page(export_id, number)
        number += 1


@pytest.mark.parametrize("stored", [False, True])
def test_an_export_read_between_commits_is_the_live_state_when_it_began(tmp_path, stored):
    for seed in range(20):
        state = StoredShardState(0, tmp_path / f"s{seed}") if stored else ShardState(0)
        _check_export_under_writes(state, random.Random(seed))
        if stored:
            state.close()


def _check_export_under_writes(state: ShardState, rng: random.Random) -> None:
    log = Log(state)
    txids = iter(range(1000, 10**6))
    for i in range(0, 120, 2):
        log.run(COMMIT, put(next(txids), f"k{i:03d}", rng.randrange(100)).to_wire())
    log.run(COMMIT, CommitRequest(next(txids), 1, {}, (WriteOp("k004", OpKind.DELETE),)).to_wire())
    expected = _live(state)

    def writes() -> None:  # before and behind the export's walk, new keys and deletes
        for _ in range(rng.randrange(5)):
            key = f"k{rng.randrange(130):03d}"
            op = WriteOp(key, OpKind.DELETE) if rng.random() < 0.25 else WriteOp(key, OpKind.PUT, rng.randrange(999))
            log.run(COMMIT, CommitRequest(next(txids), 1, {}, (op,)).to_wire())
            state.flush()

    assert _export_all(state, 7, page_bytes=100, between=writes) == expected
    assert state.exports._by_id[7].finished  # kept a while for a lost last answer, keeping nothing aside


def test_exports_and_a_raft_image_run_side_by_side():
    log = Log()
    for i in range(30):
        log.run(COMMIT, put(100 + i, f"k{i:02d}", i).to_wire())
    before = log.state.snapshot()
    expected = _live(log.state)
    parts = log.state.snapshot_parts()
    image = [next(parts)]
    first, _ = log.state.begin_export(1, 50)
    second, _ = log.state.begin_export(2, 50)
    for i in range(30):
        log.run(COMMIT, put(200 + i, f"k{i:02d}", -i).to_wire())
    image += list(parts)
    assert b"".join(image) == before
    for export_id, page in ((1, first), (2, second)):
        got = {k: Versioned.from_wire(w) for k, w in page}
        more, number = True, 0
        while more:
            page, more = log.state.export_page(export_id, number)
            got.update((k, Versioned.from_wire(w)) for k, w in page)
            number += 1
        assert got == expected


def test_an_export_ends_when_asked_when_idle_or_when_the_state_is_replaced(monkeypatch):
    log = Log()
    for i in range(20):
        log.run(COMMIT, put(100 + i, f"k{i:02d}", i).to_wire())
    now = [0.0]
    log.state.clock = lambda: now[0]
    log.state.begin_export(1, 10)
    log.state.exports.end(1)
    with pytest.raises(TransactionConflict, match="export 1 is gone"):
        log.state.export_page(1, 0)

    log.state.begin_export(2, 10)
    now[0] += imaging.EXPORT_IDLE_S + 1
    with pytest.raises(TransactionConflict, match="export 2 is gone"):
        log.state.export_page(2, 0)

    log.state.begin_export(3, 10)
    log.run(WIPE)
    with pytest.raises(TransactionConflict, match="export 3 is gone"):
        log.state.export_page(3, 0)


def test_a_replica_serves_a_bounded_number_of_exports_at_once():
    log = Log()
    log.run(COMMIT, put(1, "a", 1).to_wire())
    log.run(COMMIT, put(2, "b", 2).to_wire())
    for export_id in range(imaging.MAX_EXPORTS):
        log.state.begin_export(export_id, 1)
    with pytest.raises(TransactionConflict, match="exports .* are under way"):
        log.state.begin_export(99, 1)
    with pytest.raises(InvalidOperation, match="under way already"):
        log.state.exports.end(0) or log.state.begin_export(1, 1)
    log.state.begin_export(0, 1)  # one ended: room again


def test_a_page_asked_again_is_answered_again_and_a_finished_export_goes_after_a_while():
    """A reader whose answer was lost asks the same page again: the same page, not the next
    (which would lose one). Any other number is refused. A finished export answers its last
    page again for FINISHED_KEEP_S, takes no room among the exports under way, then goes."""
    log = Log()
    for i in range(6):
        log.run(COMMIT, put(100 + i, f"k{i}", i).to_wire())
    now = [0.0]
    log.state.clock = lambda: now[0]
    log.state.begin_export(1, 1)  # a key per page
    first = log.state.export_page(1, 0)
    assert log.state.export_page(1, 0) == first and first[0][0][0] == "k0"
    with pytest.raises(TransactionConflict, match="page 5 cannot be next"):
        log.state.export_page(1, 5)
    pages = [log.state.export_page(1, n) for n in range(1, 7)]
    assert [p[0][0][0] for p in pages[:5]] == ["k1", "k2", "k3", "k4", "k5"] and pages[-1] == [[], False]
    assert log.state.export_page(1, 6) == [[], False]
    for export_id in range(2, 2 + imaging.MAX_EXPORTS):
        log.state.begin_export(export_id, 1)  # the finished one takes no room
    now[0] += imaging.FINISHED_KEEP_S + 1
    with pytest.raises(TransactionConflict):
        log.state.export_page(1, 6)
