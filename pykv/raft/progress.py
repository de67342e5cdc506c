"""The leader's view of each follower (match/next, probe/replicate/snapshot flow) and quorum math."""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable, Mapping


class ProgressState(enum.IntEnum):
    """How the leader currently sends entries to one follower."""

    PROBE = 0  # one append at a time until we learn where the follower's log matches ours
    REPLICATE = 1  # pipelined appends, ``next`` advanced optimistically, bounded by inflights
    SNAPSHOT = 2  # a snapshot is on its way; send nothing until it lands


class Progress:
    """Replication state of one peer, kept by the leader."""

    __slots__ = (
        "match", "next", "state", "probe_sent", "pending_snapshot", "recent_active",
        "inflights", "max_inflight", "snapshot_elapsed", "match_doubted",
    )

    def __init__(self, next_index: int, max_inflight: int, match: int = 0) -> None:
        self.match = match
        self.next = next_index
        self.state = ProgressState.PROBE
        self.probe_sent = False
        self.pending_snapshot = 0
        self.recent_active = False
        self.inflights: deque[int] = deque()  # last index of each append in flight
        self.max_inflight = max_inflight
        self.snapshot_elapsed = 0
        # The follower refused what follows ``match`` once: probed again at ``match`` to
        # tell a refusal delivered late (after the ack) from a follower that lost entries.
        self.match_doubted = False

    def __repr__(self) -> str:
        return (
            f"Progress(match={self.match}, next={self.next}, state={self.state.name}, "
            f"probe_sent={self.probe_sent}, inflight={len(self.inflights)})"
        )

    def _reset_state(self, state: ProgressState) -> None:
        self.state = state
        self.probe_sent = False
        self.pending_snapshot = 0
        self.inflights.clear()
        self.snapshot_elapsed = 0

    def become_probe(self) -> None:
        if self.state == ProgressState.SNAPSHOT:
            pending = self.pending_snapshot
            self._reset_state(ProgressState.PROBE)
            self.next = max(self.match + 1, pending + 1)
        else:
            self._reset_state(ProgressState.PROBE)
            self.next = self.match + 1

    def become_replicate(self) -> None:
        self._reset_state(ProgressState.REPLICATE)
        self.next = self.match + 1

    def become_snapshot(self, snapshot_index: int) -> None:
        self._reset_state(ProgressState.SNAPSHOT)
        self.pending_snapshot = snapshot_index

    def doubt_match(self) -> bool:
        """The follower refused what follows ``match``, an entry it acknowledged, its log
        ending before it. The first time, probe it at ``match`` again (a refusal sent before
        the ack and delivered after it says nothing) and return False; the second time in a
        row it lost the entries: return True (forget_match)."""
        if self.match_doubted:
            return True
        self.become_probe()
        self.match_doubted = True
        return False

    def forget_match(self, follower_end: int) -> None:
        """The follower lost entries it had acknowledged: none of its log is known to match
        ours any more; probe from where its log now ends (``follower_end``) down."""
        self._reset_state(ProgressState.PROBE)
        self.match = 0
        self.next = follower_end + 1
        self.match_doubted = False

    def maybe_update(self, index: int) -> bool:
        """The follower acknowledged ``index``; False if that is old news."""
        updated = False
        if index >= self.match:
            self.match_doubted = False  # it holds what it acknowledged
        if self.match < index:
            self.match = index
            updated = True
            self.probe_sent = False
        self.next = max(self.next, index + 1)
        return updated

    def maybe_decr_to(self, rejected: int, match_hint: int) -> bool:
        """The follower rejected an append at ``rejected``; back off (False if stale)."""
        if self.state == ProgressState.REPLICATE:
            if rejected <= self.match:
                return False
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False
        self.next = max(min(rejected, match_hint + 1), self.match + 1, 1)
        self.probe_sent = False
        return True

    def is_paused(self) -> bool:
        if self.state == ProgressState.PROBE:
            return self.probe_sent
        if self.state == ProgressState.REPLICATE:
            return len(self.inflights) >= self.max_inflight
        return True

    def sent_append(self, last_index: int | None) -> None:
        """Record that an append ending at ``last_index`` (None: no entries) went out."""
        if self.state == ProgressState.REPLICATE:
            if last_index is not None:
                self.next = last_index + 1
                self.inflights.append(last_index)
        elif self.state == ProgressState.PROBE:
            self.probe_sent = True

    def free_inflights_to(self, index: int) -> None:
        while self.inflights and self.inflights[0] <= index:
            self.inflights.popleft()


def majority(n: int) -> int:
    return n // 2 + 1


def committed_index(voters: Iterable[int], match: Mapping[int, int]) -> int:
    """The highest index that a majority of ``voters`` has (0 for an empty configuration)."""
    values = sorted((match.get(v, 0) for v in voters), reverse=True)
    if not values:
        return 0
    return values[majority(len(values)) - 1]


class VoteResult(enum.IntEnum):
    PENDING = 0
    WON = 1
    LOST = 2


def vote_result(voters: Iterable[int], votes: Mapping[int, bool]) -> VoteResult:
    """Whether the granted votes in ``votes`` make a majority of ``voters`` yet."""
    voters = list(voters)
    granted = sum(1 for v in voters if votes.get(v) is True)
    rejected = sum(1 for v in voters if votes.get(v) is False)
    need = majority(len(voters))
    if granted >= need:
        return VoteResult.WON
    if rejected > len(voters) - need:
        return VoteResult.LOST
    return VoteResult.PENDING
