"""NodeLiveness: which peer nodes spoke lately, counted in ticks; what quiesced groups rely on.

A quiesced Raft group (see pykv.raft.node) sends nothing and runs no timer, so its followers
cannot notice a dead leader by themselves. A driver that hosts groups keeps one
NodeLiveness for its whole node. It calls ``heard(node)`` for every message that arrives
and ``tick()`` on every tick. Once per heartbeat it passes each quiesced group to
``watch``, then sends ``keepalives()``. The rules:

- a node leading a quiesced group sends one KEEPALIVE per heartbeat to each of that
  group's peers, however many groups it leads (so idle shards cost one tiny message
  per node pair, not one heartbeat per group);
- a quiesced follower whose leader's node has been silent for ``silence_ticks`` (an
  election timeout) wakes, as if its election timer had run all along, and campaigns;
- a node heard again after such a silence (it was down, paused or cut off) gets one beat
  from every quiesced group led here (``returned``), so a leader that was paused and
  replaced meanwhile learns the new term and steps down.

Pure like the rest of pykv.raft: ticks in, messages and wake-ups out; no clock, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

from pykv.raft.messages import Message, MsgType, Role
from pykv.raft.node import RaftNode

NO_GROUP = -1  # the group of a KEEPALIVE: it speaks for the node, not for a group


class NodeLiveness:
    """The last tick at which each peer node was heard from, and the rules above."""

    def __init__(self, node_id: int, silence_ticks: int) -> None:
        self.node_id = node_id
        self.silence_ticks = silence_ticks
        self.now = 0
        self._heard: dict[int, int] = {}
        self._quiet_peers: set[int] = set()

    def tick(self) -> None:
        self.now += 1

    def heard(self, node: int) -> bool:
        """Note a message from ``node``; True when it had been silent for ``silence_ticks``
        (it is back: pass the groups to ``returned``)."""
        last = self._heard.get(node)
        self._heard[node] = self.now
        return last is not None and self.now - last >= self.silence_ticks

    def watch(self, raft: RaftNode) -> bool:
        """Once per heartbeat, for a quiesced group: note a leader's peers for keepalives;
        wake a follower whose leader's node fell silent. True when it woke the group."""
        if raft.role == Role.LEADER:
            self._quiet_peers.update(raft.prs)
            return False
        silent = self.now - self._heard.get(raft.leader_id, 0)
        if silent < self.silence_ticks:
            return False
        raft.wake(silent_ticks=silent)
        return True

    def keepalives(self) -> list[Message]:
        """One KEEPALIVE to every peer noted by ``watch`` since the last call."""
        peers, self._quiet_peers = self._quiet_peers - {self.node_id}, set()
        return [Message(MsgType.KEEPALIVE, peer, self.node_id, 0, group=NO_GROUP) for peer in sorted(peers)]

    @staticmethod
    def returned(node: int, rafts: Iterable[RaftNode]) -> list[RaftNode]:
        """``node`` is back: wake every quiesced group led here that it is a member of, so
        it beats once. Returns the groups woken."""
        woken = []
        for raft in rafts:
            if raft.quiesced and raft.role == Role.LEADER and node in raft.prs:
                raft.wake()
                woken.append(raft)
        return woken
