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

A consistent scan runs here too (``scan_rounds``): passes over every shard until two agree,
and, when the range keeps changing, a lock on the range (a PREPARE that holds the range
against writers) for one last pass.

A COMMIT or PREPARE refused because a key is locked (KeyLocked: a prepared transaction not
finished yet, typically one whose FINISH is a few milliseconds away) changed nothing on its
shard, so the same request goes again after a pause (LOCK_PAUSES) before the commit gives
up: a client that commits transactions on the same keys one after another does not see a
conflict that only the previous one's FINISH in flight caused. A COMMIT_DECIDE still
locked after the pauses is given up with DECIDE(abort), so that the prepared parts do not
wait for their recovery.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from pykv.errors import KeyLocked, Timeout, TransactionConflict, Unavailable, by_name
from pykv.replica.shard import ALREADY_COMMITTED, COMMIT, COMMIT_DECIDE, DECIDE, FINISH, PREPARE
from pykv.txn.model import (
    PASSES_BEFORE_LOCKING,
    CommitRequest,
    ScanItems,
    ScanPasses,
    Versioned,
    first_live,
)

# Seconds to wait before sending a request refused on a lock again, one pause per retry.
LOCK_PAUSES = (0.002, 0.005, 0.01, 0.02, 0.04)
# A Send's command for one pass over one shard: args [prefix, start, end, limit, True].
SCAN = "scan"


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

    name: str  # "commit", "prepare", "decide", "give up", "abort"; "scan", "lock", "release"
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


def scan_rounds(
    request: CommitRequest, shards: list[int], limit: int | None,
    passes_before_locking: int = PASSES_BEFORE_LOCKING,
) -> Generator[Round, Any, ScanItems]:
    """The rounds of a consistent scan of ``request.ranges[0]`` over ``shards``; returns its
    live items (at most ``limit``): one snapshot of the range, taken inside the scan.

    Passes over every shard first, until two in a row agree (ScanPasses; cheap while the
    range is quiet). When the range changed under each of ``passes_before_locking`` passes
    (writers keep writing there), it is locked: ``request`` (no keys, the range) is
    PREPAREd on every shard, each shard its own coordinator, so that recovery releases a
    lock whose client vanished. From then on writes into the range are refused (KeyLocked,
    which writers retry), and a pass waits for the prepared writers already in it, so one
    more pass reads a range that does not change until the lock is released with FINISH
    (abort) on every shard. Every shard's range was then frozen from the moment all were
    locked and their earlier writers done until the last pass's read: the pass is the range
    at that moment, provided each release answers that the lock was still held (else
    TransactionConflict: scan again). Raises Timeout/Unavailable when a shard does not answer.
    """
    key_range = request.ranges[0]
    one_pass = [Send(s, SCAN, [*key_range, limit, True]) for s in shards]
    passes = ScanPasses()
    for _ in range(passes_before_locking):
        if passes.feed(merged_pass((yield Round("scan", one_pass)), limit)):
            return passes.result
    votes = yield Round("lock", [Send(s, PREPARE, [request.to_wire(), s, shards]) for s in shards])
    refusal, items = _refusal(votes), None
    if refusal is None:
        replies = yield Round("scan", one_pass)
        refusal = next((r for r in replies if isinstance(r, BaseException)), None)
        if refusal is None:
            items = first_live(merged_pass(replies, limit), None, deleted=False)
    release = [Send(s, FINISH, [request.txid, False]) for s in shards]
    if refusal is not None:
        yield Round("release", release, wait=False)
        raise refusal
    released = yield Round("release", release)
    if any(r is not None for r in released):
        # Not released by us while held (recovery took a lock of a scan that ran too long,
        # or the answer was lost): writers may have changed the range before the pass.
        raise TransactionConflict(f"scan {request.txid}: a shard no longer held its range lock; scan again")
    assert items is not None
    return items


def merged_pass(replies: list[Any], limit: int | None) -> ScanItems:
    """One pass: the shards' items (with what tombstones they sent) in key order, up to
    ``limit`` live; raises the first error among the replies."""
    for reply in replies:
        _raise_if_error(reply)
    runs = [[(k, Versioned.from_wire(v)) for k, v in reply] for reply in replies]
    return first_live(heapq.merge(*runs, key=lambda item: item[0]), limit)


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
