"""How a client commits a transaction with the shard commands, as rounds of requests (sans-I/O).

The network client (pykv.client.cluster) and the transaction simulator (pykv.sim.txnworld)
run the same steps: ``commit_rounds`` yields each ``Round`` of requests to send, takes back
their results, and decides what comes next, so the simulator proves the client's own
protocol rather than a copy of it.

- Every key of the transaction (read or written) belongs to a shard. Keys in one shard: ONE
  COMMIT there, validated when every replica applies it.
- Otherwise two-phase commit over the shards' Raft groups: PREPARE each other shard's part
  (validated and locked, replicated), then, if every vote is yes, COMMIT_DECIDE on the
  coordinator shard (its own part and the decision record in one proposal); the coordinator
  shard's leader then sends FINISH to the others. A refused prepare aborts: FINISH(abort)
  goes to the others, nobody waiting for it (a participant that never hears it asks the
  coordinator shard, which then records abort).

A COMMIT or PREPARE refused because a key is locked (KeyLocked: a prepared transaction not
finished yet, typically one whose FINISH is a few milliseconds away) changed nothing on its
shard, so the same request goes again after a pause (LOCK_PAUSES) before the commit gives
up: a client that commits transactions on the same keys one after another does not see a
conflict that only the previous one's FINISH in flight caused. A COMMIT_DECIDE still
locked after the pauses is given up with DECIDE(abort), so that the prepared parts do not
wait for their recovery.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from pykv.errors import KeyLocked, Timeout, TransactionConflict, Unavailable, by_name
from pykv.replica.shard import ALREADY_COMMITTED, COMMIT, COMMIT_DECIDE, DECIDE, FINISH, PREPARE
from pykv.txn.model import CommitRequest

# Seconds to wait before sending a request refused on a lock again, one pause per retry.
LOCK_PAUSES = (0.002, 0.005, 0.01, 0.02, 0.04)


@dataclass(slots=True)
class Send:
    """One request: a shard command (its tag in pykv.replica.shard) and its arguments."""

    shard: int
    command: str
    args: list


@dataclass(slots=True)
class Round:
    """Requests to send at once. ``wait``: their results come back to the flow (in order:
    each the request's result, or the exception it raised); else nobody waits for them."""

    name: str  # "commit", "prepare", "decide", "give up" or "abort"
    sends: list[Send] = field(default_factory=list)
    wait: bool = True
    pause: float = 0.0  # seconds to wait before sending (a retry after KeyLocked)


CommitFlow = Generator[Round, "list[Any] | None", None]


def placement(request: CommitRequest, shard_of: Callable[[str], int]) -> dict[int, set[str]]:
    """The shards a transaction touches, each with its keys (read or written)."""
    reads = request.reads
    by_shard: dict[int, set[str]] = {}
    for key in reads:
        by_shard.setdefault(shard_of(key), set()).add(key)
    for op in request.writes:
        if op.key not in reads:  # a key read and written is placed already
            by_shard.setdefault(shard_of(op.key), set()).add(op.key)
    return by_shard


def commit_rounds(request: CommitRequest, shard_of: Callable[[str], int]) -> CommitFlow:
    """The rounds that commit ``request``. Returns once it committed; raises its refusal
    (TransactionConflict and the like: it did not commit) or Timeout/Unavailable from the
    last round (it may have: the participants settle it with the coordinator shard)."""
    by_shard = placement(request, shard_of)
    if len(by_shard) == 1:
        (shard,) = by_shard
        (result,) = yield from _until_unlocked("commit", [Send(shard, COMMIT, [request.to_wire()])])
        _raise_if_error(result)
        return
    shards = sorted(by_shard)
    # Spread coordinator duty over the shards, deterministically per transaction.
    coordinator = shards[request.txid % len(shards)]
    others = [s for s in shards if s != coordinator]
    votes = yield from _until_unlocked("prepare", [
        Send(s, PREPARE, [request.to_wire(by_shard[s]), coordinator, shards]) for s in others
    ])
    refusal = _refusal(votes)
    if refusal is not None:
        yield Round("abort", [Send(s, FINISH, [request.txid, False]) for s in others], wait=False)
        if isinstance(refusal, (Timeout, Unavailable)):
            raise TransactionConflict(
                f"transaction {request.txid} aborted: a participant did not vote ({refusal})"
            ) from refusal
        raise refusal
    # The coordinator's own part and the decision record: one proposal, one round. Until
    # the others apply FINISH their prepared keys stay locked and reads of them wait, so
    # nobody sees half of the transaction.
    (result,) = yield from _until_unlocked("decide", [
        Send(coordinator, COMMIT_DECIDE, [request.to_wire(by_shard[coordinator]), others])
    ])
    if _locked(result):
        # Its own part is still locked, and nothing is recorded: record abort rather than
        # leave the others locked until their recovery does (an earlier copy of the
        # COMMIT_DECIDE may still have committed meanwhile: then that decision stands).
        (decision,) = yield Round("give up", [Send(coordinator, DECIDE, [request.txid, False, request.timestamp])])
        if decision is True:
            return
        if decision is not False:
            raise Timeout(f"transaction {request.txid}: its decision is unknown ({decision})")
        yield Round("abort", [Send(s, FINISH, [request.txid, False]) for s in others], wait=False)
    _raise_if_error(result)


def _until_unlocked(name: str, sends: list[Send]) -> Generator[Round, Any, list[Any]]:
    """Send a round; send again, after a pause, the requests refused on a lock while that
    is all that went wrong (LOCK_PAUSES). The results, in the order of ``sends``."""
    results: list[Any] = [None] * len(sends)
    waiting = list(range(len(sends)))
    for pause in (0.0, *LOCK_PAUSES):
        got = yield Round(name, [sends[i] for i in waiting], pause=pause)
        for i, result in zip(waiting, got, strict=True):
            results[i] = result
        waiting = [i for i in waiting if _locked(results[i])]
        if not waiting or any(_no(r) and not _locked(r) for r in results):
            break
    return results


def _locked(result: Any) -> bool:
    """A refusal on a lock: KeyLocked raised, or a vote naming it."""
    return isinstance(result, KeyLocked) or (isinstance(result, list) and result[0] == KeyLocked.__name__)


def _no(result: Any) -> bool:
    """A refusal of any kind (as opposed to None, a yes)."""
    return isinstance(result, BaseException) or (isinstance(result, list) and result[0] != ALREADY_COMMITTED)


def _refusal(votes: list[Any]) -> BaseException | None:
    """The first no among the votes (an exception, or a refusal [error name, message])."""
    for vote in votes:
        if isinstance(vote, BaseException):
            return vote
        if _no(vote):
            return by_name(vote[0], vote[1])
    return None


def _raise_if_error(result: Any) -> None:
    if isinstance(result, BaseException):
        raise result
