"""Which participants have applied a coordinator shard's commit, and which commits may be released.

A coordinator shard keeps every commit decision (``ShardState.unfinished``) until all the
other participants have applied it; then a release lets it be forgotten in turn. The
leader of the coordinator shard tells the participants (FINISH) and counts their answers
here. The commits that every participant answered ride on the group's next COMMIT_DECIDE
(``commit_decide_args``: under load, no command of their own, and most are released
before the state machine ever writes them down); those still waiting when the node sweeps
go in a RELEASE command. The sweep also sends FINISH again for commits that stayed
unfinished too long (a lost FINISH or answer, a new leader that never sent them), and
finds the prepared transactions whose coordinator went quiet, to settle with the
coordinator shard. Sans-I/O: ``sweep`` says what is owed, and the node (pykv.server.node)
and the transaction simulator (pykv.sim.txnworld) do the sending and the proposing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pykv.replica.shard import Prepared, ShardState

if TYPE_CHECKING:
    from pykv.replica.host import Group


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


@dataclass
class Sweep:
    """The two-phase-commit work a node's leaders owe now (``sweep``)."""

    # (group, txids) to release with a RELEASE command.
    releases: list[tuple[int, list[int]]] = field(default_factory=list)
    # (group, txid, participants) to send FINISH again, as for a commit just decided.
    finish_again: list[tuple[int, int, list[int]]] = field(default_factory=list)
    # (group, txid, prepared) to settle: ask the coordinator shard, then FINISH with that.
    settle: list[tuple[int, int, Prepared]] = field(default_factory=list)


def sweep(
    groups: Mapping[int, Group],
    finishes: FinishTracker,
    now: float,
    after: float,
    settling: Collection[tuple[int, int]],
    skip: Collection[int] = (),
    orphans: Collection[tuple[int, int]] = (),
) -> Sweep:
    """What the groups this node leads owe, every ``after`` / 4 seconds: release the commits
    every participant applied, send FINISH again for those unfinished ``after`` seconds,
    and settle the transactions prepared that long (but not those in ``settling``, whose
    settling is under way). Releases of groups led elsewhere now are left to their leader's
    sweep; ``skip``: groups with no transactions (the metadata group).

    ``orphans``: (group, txid) of prepares whose client connection closed (a client or a
    scanner that died mid-commit), settled now rather than ``after`` seconds on. That is
    safe however alive the client is: settling asks the coordinator shard, whose first
    recorded decision stands for the client's COMMIT_DECIDE too (an abort, then)."""
    work = Sweep()
    for gid, txids in finishes.take_releases().items():
        group = groups.get(gid)
        if group is not None and group.raft.is_leader():
            work.releases.append((gid, txids))
    for gid, group in groups.items():
        if gid in skip or not group.raft.is_leader():
            continue
        state = group.state
        work.finish_again += [(gid, txid, others) for txid, others in finishes.overdue(gid, state, now, after)]
        work.settle += [
            (gid, txid, prepared) for txid, prepared in state.prepared.items()
            if (now - prepared.since >= after or (gid, txid) in orphans) and (gid, txid) not in settling
        ]
    return work


class Orphans:
    """Prepares whose client connection closed, (group, txid) -> when, for ``after`` seconds:
    settled at once if applied here then (orphans_to_settle), else by a sweep within that
    time (``sweep(orphans=)``). The node and the simulator keep one per node."""

    def __init__(self) -> None:
        self._since: dict[tuple[int, int], float] = {}

    def mark(self, keys: Iterable[tuple[int, int]], now: float) -> None:
        for key in keys:
            self._since[key] = now

    def expire(self, now: float, after: float) -> None:
        """Forget those marked ``after`` seconds ago or more (a sweep's rule covers them)."""
        self._since = {key: since for key, since in self._since.items() if now - since < after}

    def __contains__(self, key: object) -> bool:
        return key in self._since


def orphans_to_settle(
    groups: Mapping[int, Group], orphans: Iterable[tuple[int, int]], settling: Collection[tuple[int, int]],
) -> list[tuple[int, int, Prepared]]:
    """(group, txid, prepared) of the ``orphans`` (prepares whose client connection just
    closed) that this node leads, still prepared and not being settled: what a node settles
    at once, without a whole sweep (no releases, no FINISH again) for each closed connection."""
    found = []
    for gid, txid in orphans:
        group = groups.get(gid)
        if group is None or not group.raft.is_leader() or (gid, txid) in settling:
            continue
        prepared = group.state.prepared.get(txid)
        if prepared is not None:
            found.append((gid, txid, prepared))
    return found
