"""The client's commit flow, driven by hand: which rounds it sends and what their answers mean."""

from __future__ import annotations

import pytest

from pykv.errors import KeyLocked, ScanTooLarge, Timeout, TransactionConflict
from pykv.replica.commitflow import (
    LOCK_PAUSES,
    PagedPass,
    Round,
    Send,
    commit_rounds,
    export_pages,
    scan_rounds,
    stream_scan_rounds,
)
from pykv.replica.shard import COMMIT, COMMIT_DECIDE, DECIDE, FINISH, PREPARE
from pykv.txn.model import CommitRequest, KeyRange, Versioned, WriteOp
from pykv.types import OpKind

LOCKED = ["KeyLocked", "key 'a' is locked by a prepared transaction"]


def _request(txid: int, *keys: str) -> CommitRequest:
    return CommitRequest(txid, 1, {}, tuple(WriteOp(k, OpKind.PUT, 1, None) for k in keys))


def _shard_of(key: str) -> int:
    return ord(key[0]) - ord("a")  # "a..." -> shard 0, "b..." -> shard 1, ...


def _drive(request: CommitRequest, answer) -> tuple[list[Round], BaseException | None]:
    """Run the flow, answering each round with answer(round, number); the rounds sent and
    what the commit raised (None: committed)."""
    flow = commit_rounds(request, _shard_of)
    rounds: list[Round] = []
    results = None
    try:
        while True:
            round_ = flow.send(results)
            rounds.append(round_)
            results = answer(round_, len(rounds)) if round_.wait else None
    except StopIteration:
        return rounds, None
    except Exception as exc:  # noqa: BLE001 - what the client would raise
        return rounds, exc


def test_a_single_shard_commit_is_one_commit_sent_again_while_a_lock_holds_it():
    def answer(round_, n):
        return [KeyLocked("locked") if n <= 2 else None]

    rounds, raised = _drive(_request(1, "a1", "a2"), answer)
    assert raised is None
    assert [(r.name, [s.command for s in r.sends], r.pause) for r in rounds] == [
        ("commit", [COMMIT], 0.0), ("commit", [COMMIT], LOCK_PAUSES[0]), ("commit", [COMMIT], LOCK_PAUSES[1])
    ]
    # Locked for longer than the pauses: the conflict is the caller's.
    rounds, raised = _drive(_request(1, "a1"), lambda r, n: [KeyLocked("locked")])
    assert isinstance(raised, KeyLocked) and len(rounds) == 1 + len(LOCK_PAUSES)


def test_two_phase_prepares_the_others_then_decides_on_the_coordinator():
    def answer(round_, n):
        if round_.name == "prepare":
            # Shard 2's key is locked at first: only its prepare goes again.
            return [LOCKED if n == 1 and s.shard == 2 else None for s in round_.sends]
        return [None]

    rounds, raised = _drive(_request(3, "a", "b", "c"), answer)  # coordinator: shards[3 % 3] = 0
    assert raised is None
    assert [(r.name, [(s.shard, s.command) for s in r.sends]) for r in rounds] == [
        ("prepare", [(1, PREPARE), (2, PREPARE)]),
        ("prepare", [(2, PREPARE)]),
        ("decide", [(0, COMMIT_DECIDE)]),
    ]
    assert rounds[2].sends[0].args[1] == [1, 2]  # the decision's participants


def test_a_refused_prepare_aborts_without_waiting_for_the_finishes():
    def answer(round_, n):
        return [["TransactionConflict", "b changed"] if s.shard == 1 else LOCKED for s in round_.sends]

    rounds, raised = _drive(_request(3, "a", "b", "c"), answer)
    assert isinstance(raised, TransactionConflict) and "b changed" in str(raised)
    # A definite no: the locked shard is not asked again; both prepared parts are dropped.
    assert [r.name for r in rounds] == ["prepare", "abort"]
    assert not rounds[1].wait and [(s.shard, s.command, s.args) for s in rounds[1].sends] == [
        (1, FINISH, [3, False]), (2, FINISH, [3, False])
    ]


def test_an_unanswered_prepare_aborts_and_an_unanswered_decision_is_unknown():
    rounds, raised = _drive(_request(4, "a", "b"), lambda r, n: [Timeout("no answer")])
    assert isinstance(raised, TransactionConflict) and "did not vote" in str(raised)
    assert [r.name for r in rounds] == ["prepare", "abort"]
    rounds, raised = _drive(
        _request(4, "a", "b"), lambda r, n: [None] if r.name == "prepare" else [Timeout("gone")]
    )
    assert isinstance(raised, Timeout) and [r.name for r in rounds] == ["prepare", "decide"]


@pytest.mark.parametrize("vote", [None, ["Committed", "transaction 5 already committed"]])
def test_a_yes_or_an_already_committed_vote_goes_on_to_the_decision(vote):
    rounds, raised = _drive(_request(5, "a", "b"), lambda r, n: [vote] if r.name == "prepare" else [None])
    assert raised is None and [r.name for r in rounds] == ["prepare", "decide"]


def test_a_decision_refused_on_a_lock_is_sent_again_then_given_up_as_an_abort():
    def answer(round_, n):
        if round_.name == "prepare":
            return [None]
        if round_.name == "decide":
            return [KeyLocked("locked")]
        return [False]  # the DECIDE(abort) is recorded

    rounds, raised = _drive(_request(4, "a", "b"), answer)  # coordinator: shards[4 % 2] = 0
    assert isinstance(raised, KeyLocked)
    assert [r.name for r in rounds] == ["prepare", *["decide"] * (1 + len(LOCK_PAUSES)), "give up", "abort"]
    give_up = rounds[-2].sends[0]
    assert (give_up.shard, give_up.command, give_up.args[:2]) == (0, DECIDE, [4, False])
    assert [(s.shard, s.command) for s in rounds[-1].sends] == [(1, FINISH)] and not rounds[-1].wait
    # An earlier copy of the COMMIT_DECIDE committed after all: DECIDE answers commit.
    rounds, raised = _drive(_request(4, "a", "b"), lambda r, n: [True] if r.name == "give up" else answer(r, n))
    assert raised is None and rounds[-1].name == "give up"
    # Unlocked on a retry: committed, no give up.
    rounds, raised = _drive(
        _request(4, "a", "b"),
        lambda r, n: [KeyLocked("locked")] if r.name == "decide" and n == 2 else [None],
    )
    assert raised is None and [r.name for r in rounds] == ["prepare", "decide", "decide"]


# --- scans: pages from every shard, merged in key order ------------------------------------


class _Shards:
    """Shards that answer SCAN a page of ``size`` items at a time, from sorted keys."""

    def __init__(self, keys_by_shard: dict[int, list[str]], size: int) -> None:
        self.keys, self.size, self.sent = keys_by_shard, size, []

    def answer(self, send: Send) -> list:
        self.sent.append(send)
        prefix, start, end, limit, deleted, page_bytes = send.args
        assert page_bytes == 1234 and deleted is True
        keys = [k for k in self.keys[send.shard] if start is None or k >= start]
        keys = keys[:limit] if limit is not None else keys
        page = keys[:self.size]
        more = keys[self.size] if len(keys) > self.size else None
        return [[[k, Versioned(k.upper(), b"c", 1).to_wire()] for k in page], more]


def test_a_paged_pass_merges_pages_in_key_order_and_holds_one_page_per_shard():
    shards = _Shards({0: ["a", "d", "e", "f", "g"], 1: ["b", "c"], 2: []}, size=2)
    paged = PagedPass(KeyRange(""), [0, 1, 2], None, True, 1234)
    out, rounds = [], 0
    while not paged.done:
        sends = paged.sends()
        assert len({s.shard for s in sends}) == len(sends) and rounds < 10
        paged.feed([shards.answer(s) for s in sends])
        ready = paged.ready()
        # Nothing is handed out past a shard that has more to send: its next key may be less.
        assert all(k < "f" for k, _ in ready) if rounds == 0 else True
        out += ready
        rounds += 1
    assert [(k, v.value) for k, v in out] == [(k, k.upper()) for k in "abcdefg"]
    assert rounds == 3  # shard 0 in pages [a d] [e f] [g]; shards 1 and 2 in one each
    assert [s.args[1] for s in shards.sent if s.shard == 0] == [None, "e", "g"]


def test_a_paged_pass_stops_at_the_limit_of_live_keys():
    shards = _Shards({0: ["a", "c", "e"], 1: ["b", "d", "f"]}, size=1)
    paged = PagedPass(KeyRange(""), [0, 1], 3, True, 1234)
    out = []
    while not paged.done:
        paged.feed([shards.answer(s) for s in paged.sends()])
        out += paged.ready()
    assert [k for k, _ in out] == ["a", "b", "c"]


def test_a_busy_scan_locks_the_range_only_while_its_exports_begin():
    """After the passes differ, the range is locked on every shard (PREPARE), each shard
    begins an export of it (carrying the lock to send again while it waits: Round.keep),
    the lock is released (FINISH abort), and only then are the exports' pages read, from
    the nodes that hold them. A release that finds the lock gone makes the scan fail."""
    request = CommitRequest(7, 0, {}, (), ranges=(KeyRange("k"),))
    versions = iter(range(100))
    holders = {0: 2, 1: 3}

    def answer(round_: Round) -> list:
        if round_.name == "scan":  # every pass differs: a new version each time
            return [[[["k1", [b"v%d" % next(versions), 1, 1]]] if s.shard == 0 else [], None] for s in round_.sends]
        if round_.name == "export":
            return [[holders[s.shard], [], True] for s in round_.sends]
        if round_.name == "export pages":
            return [[s.node, [["k1", [b"c", 1, "one"]]] if s.shard == 0 else [], False] for s in round_.sends]
        return [None] * len(round_.sends)

    for released, expected in ((None, [("k1", "one")]), (["TransactionConflict", "aborted"], None)):
        flow = scan_rounds(request, [0, 1], None, 3, 1234, 0.4)
        rounds, results = [], None
        try:
            while True:
                round_ = flow.send(results)
                rounds.append(round_)
                results = [released, None] if round_.name == "release" else answer(round_)
        except StopIteration as done:
            assert [(k, v.value) for k, v in done.value] == expected
        except TransactionConflict:
            assert expected is None
        names = [r.name for r in rounds]
        lock, begin = rounds[3], rounds[4]
        assert names[:6] == ["scan", "scan", "scan", "lock", "export", "release"]
        assert names[6:] == (["export pages"] if expected else [])
        assert [s.command for s in lock.sends] == [PREPARE, PREPARE]
        assert [s.args for s in begin.sends] == [[7, "begin", "k", None, None]] * 2
        assert begin.keep == lock.sends and begin.keep_every == 0.4
        assert all(not r.keep for r in rounds[:3])
        if expected:
            assert [(s.shard, s.node, s.args) for s in rounds[6].sends] == [(0, 2, [7, "next", 0]), (1, 3, [7, "next", 0])]


def test_a_streamed_scan_past_its_budget_returns_the_exports_left_to_read():
    """A pass too large for the budget goes to exports at once (no ScanTooLarge); once the
    pages held pass the budget, the flow returns them with the exports still to read
    (Scanned.rest), ending none; the rest's pages follow in key order. scan_rounds, with
    the same budget, raises ScanTooLarge."""
    request = CommitRequest(9, 0, {}, (), ranges=(KeyRange("k"),))
    pages = {0: [["k1", "k3"], ["k5"]], 1: [["k2", "k4"], ["k6"]]}

    def answer(round_: Round) -> list:
        if round_.name == "scan":
            return [[[[k, [b"v", 1, 1]] for k in ("k1", "k2", "k3")], None] for _ in round_.sends]
        if round_.name == "export":
            return [[s.shard + 2, [], True] for s in round_.sends]
        if round_.name == "export pages":
            return [[s.node, [[k, [b"c", 1, k.upper()]] for k in pages[s.shard][s.args[2]]],
                     s.args[2] == 0] for s in round_.sends]
        return [None] * len(round_.sends)

    def run(flow):
        names, results = [], None
        try:
            while True:
                round_ = flow.send(results)
                names.append(round_.name)
                results = answer(round_)
        except StopIteration as done:
            return names, done.value

    names, scanned = run(stream_scan_rounds(request, [0, 1], None, 3, 1234, 0.4, max_bytes=40))
    assert names == ["scan", "lock", "export", "release", "export pages"]  # no "end exports"
    assert [(k, v.value) for k, v in scanned.items] == [("k1", "K1"), ("k2", "K2"), ("k3", "K3")]
    rest = scanned.rest
    names, _ = run(export_pages(rest, (more := []).extend))
    assert set(names) == {"export pages"} and rest.done  # a page per shard per round
    assert [k for k, _ in more] == ["k4", "k5", "k6"]
    with pytest.raises(ScanTooLarge):
        run(scan_rounds(request, [0, 1], None, 3, 1234, 0.4, max_bytes=40))
