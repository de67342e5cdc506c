"""The client's commit flow, driven by hand: which rounds it sends and what their answers mean."""

from __future__ import annotations

import pytest

from pykv.errors import KeyLocked, Timeout, TransactionConflict
from pykv.replica.commitflow import LOCK_PAUSES, Round, commit_rounds
from pykv.replica.shard import COMMIT, COMMIT_DECIDE, DECIDE, FINISH, PREPARE
from pykv.txn.model import CommitRequest, WriteOp
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
