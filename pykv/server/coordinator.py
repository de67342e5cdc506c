"""Two-phase commit of a multi-shard transaction, driven by its coordinator shard's leader.

The client sends the whole transaction to the leader of the coordinator shard (one of the
shards it touches) in one ``COMMIT_ACROSS`` request. That node runs the protocol of
pykv.txn.twopc over the shards' Raft groups:

1. ``PREPARE`` every other participant (validate + lock, replicated), all at once; a shard
   this node leads is prepared by a local proposal, any other by a request to its leader;
2. on every vote yes, ``COMMIT_DECIDE`` on the coordinator shard: its own part and the
   decision record in one proposal (the first decision recorded wins); once it is applied,
   the node sends ``FINISH`` to the other participants (pykv.server.node);
3. on a refusal, ``FINISH`` (abort) to the others at once: with no decision recorded, a
   participant that never hears it asks the coordinator shard, which then records abort.

Should this node die at any point, each participant's leader settles its prepared part with
the coordinator shard, so no transaction stays in doubt (failpoints ``txn.2pc.*`` stop the
process at the two interesting points). Every step is idempotent by transaction id, so a
client that retries COMMIT_ACROSS after a timeout, on this or on a new leader, gets the
outcome that was recorded, never a second commit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from pykv.client.transport import COMMIT_DECIDE, PREPARE, error_from_reply
from pykv.errors import Timeout, TransactionConflict, Unavailable
from pykv.replica.failpoints import failpoint
from pykv.txn.model import CommitRequest

ALREADY_COMMITTED = "Committed"  # a prepare's answer when a retry finds the txn committed

ShardCall = Callable[[int, int, list], Awaitable[Any]]  # (shard, kind, body) -> result
Abort = Callable[[int, list[int]], None]  # (txid, shards) -> FINISH(abort) sent, not awaited


async def commit_across(
    call: ShardCall,
    abort: Abort,
    request: CommitRequest,
    by_shard: dict[int, set[str]],
    coordinator: int,
) -> None:
    """Commit ``request`` over the shards of ``by_shard`` (shard -> its keys).

    Returns once the decision is commit; raises the refusal (TransactionConflict or the
    participant's error) on abort, and Timeout or Unavailable when the outcome is unknown.
    """
    shards = sorted(by_shard)
    others = [s for s in shards if s != coordinator]
    votes = await asyncio.gather(
        *(
            call(s, PREPARE, [s, request.restricted_to(by_shard[s]).to_wire(), coordinator, shards])
            for s in others
        ),
        return_exceptions=True,
    )
    failpoint("txn.2pc.after_prepare")
    refusal = _refusal(votes)
    if refusal is not None:
        abort(request.txid, others)
        if isinstance(refusal, (Timeout, Unavailable)):
            raise TransactionConflict(
                f"transaction {request.txid} aborted: a participant did not vote ({refusal})"
            )
        raise refusal
    await call(
        coordinator, COMMIT_DECIDE,
        [coordinator, request.restricted_to(by_shard[coordinator]).to_wire(), others],
    )
    failpoint("txn.2pc.after_decide")


def _refusal(votes: list) -> BaseException | None:
    """The first reason not to commit among the votes (None: every participant said yes)."""
    for vote in votes:
        if isinstance(vote, BaseException):
            return vote
        if vote is not None and vote[0] != ALREADY_COMMITTED:
            return error_from_reply(vote[0], vote[1])
    return None
