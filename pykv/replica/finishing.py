"""Which participants have applied a coordinator shard's commit, and which commits may be released.

A coordinator shard keeps every commit decision (``ShardState.unfinished``) until all the
other participants have applied it; then a release lets it be forgotten in turn. The
leader of the coordinator shard tells the participants (FINISH) and counts their answers
here. The commits that every participant answered ride on the group's next COMMIT_DECIDE
(``commit_decide_args``: under load, no command of their own, and most are released
before the state machine ever writes them down); those still waiting when the node sweeps
go in a RELEASE command. The sweep also sends FINISH again for commits that stayed
unfinished too long (a lost FINISH or answer, a new leader that never sent them). Sans-I/O: the node (pykv.server.node) and the
transaction simulator (pykv.sim.txnworld) do the sending and the proposing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from pykv.replica.shard import ShardState


class FinishTracker:
    """The FINISH rounds under way of the commits this node coordinates, per group."""

    def __init__(self) -> None:
        self._waiting: dict[tuple[int, int], set[int]] = {}  # (group, txid) -> shards to answer
        self._done: defaultdict[int, list[int]] = defaultdict(list)  # group -> txids to release

    def start(self, group: int, txid: int, participants: list[int]) -> bool:
        """A round of FINISH to ``participants`` begins; False if one is under way already."""
        key = (group, txid)
        if key in self._waiting or not participants:
            return False
        self._waiting[key] = set(participants)
        return True

    def answered(self, group: int, txid: int, participant: int, applied: bool) -> None:
        """``participant``'s answer to FINISH. Applied: once all have, the txid may be
        released. Anything else (no answer, an error) ends the round; a later sweep starts
        another. A FINISH outside a round (an abort's) changes nothing."""
        key = (group, txid)
        waiting = self._waiting.get(key)
        if waiting is None:
            return
        if not applied:
            del self._waiting[key]
            return
        waiting.discard(participant)
        if not waiting:
            del self._waiting[key]
            self._done[group].append(txid)

    def commit_decide_args(self, group: int, request: object, others: list[int]) -> list:
        """The arguments of a COMMIT_DECIDE command to ``group``, carrying the txids that
        every participant has applied (if the proposal is lost, a sweep finds them again)."""
        released = self._done.pop(group, None)
        return [request, others, released] if released else [request, others]

    def take_releases(self) -> dict[int, list[int]]:
        """The txids, per group, that every participant has applied (each handed out once)."""
        done, self._done = dict(self._done), defaultdict(list)
        return done

    def overdue(self, group: int, state: ShardState, now: float, after: float) -> Iterator[tuple[int, list[int]]]:
        """(txid, participants) of the group's commits unfinished for ``after`` seconds
        whose FINISH round is not under way: the leader sends them FINISH again."""
        for txid, unfinished in list(state.unfinished.items()):
            if now - unfinished.since >= after and (group, txid) not in self._waiting:
                yield txid, unfinished.participants
