"""A lockstep in-memory driver of several RaftNodes (storage + network) for tests and examples.

It follows the Ready contract literally (persist, send, apply, advance) with messages queued
in memory and delivered only when asked, so a test can interleave any scenario by hand.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pykv.raft.log import cut_from
from pykv.raft.messages import (
    Entry,
    EntryKind,
    HardState,
    Message,
    PersistentState,
    Ready,
    Snapshot,
)
from pykv.raft.node import RaftConfig, RaftNode, bootstrap_state


@dataclass
class MemoryDisk:
    """What one node has made durable."""

    hard_state: HardState = field(default_factory=HardState)
    entries: list[Entry] = field(default_factory=list)
    snapshot: Snapshot | None = None

    def write(self, rd: Ready) -> None:
        """Apply the durable part of a Ready exactly as the contract describes."""
        if rd.snapshot is not None:
            self.snapshot = rd.snapshot
            self.entries = []
        if rd.entries:
            cut_from(self.entries, rd.entries[0].index)
            self.entries.extend(rd.entries)
        if rd.hard_state is not None:
            self.hard_state = rd.hard_state

    def state(self) -> PersistentState:
        return PersistentState(self.hard_state, tuple(self.entries), self.snapshot)


class Harness:
    """Nodes, their disks and applied logs, and a queue of messages in flight."""

    def __init__(
        self,
        ids: Iterable[int],
        config: RaftConfig | None = None,
        seed: int = 0,
        learners: Iterable[int] = (),
    ) -> None:
        self.ids = list(ids)
        self.config = config or RaftConfig()
        self.seed = seed
        self.disks: dict[int, MemoryDisk] = {}
        self.nodes: dict[int, RaftNode] = {}
        self.applied: dict[int, list[Entry]] = {}
        self.read_states: dict[int, list] = {}
        self.in_flight: deque[Message] = deque()
        self.cut: set[tuple[int, int]] = set()
        self.down: set[int] = set()
        self.filter: Callable[[Message], bool] | None = None  # return False to drop
        boot = bootstrap_state(self.ids)
        for i in self.ids:
            self.disks[i] = MemoryDisk(boot.hard_state, list(boot.entries), None)
            self._start(i)
        for i in learners:
            self.add_empty(i)

    def _start(self, i: int) -> None:
        self.nodes[i] = RaftNode(
            i, state=self.disks[i].state(), config=self.config,
            rng=random.Random(self.seed * 1000 + i),
        )
        base = self.nodes[i].log.offset
        self.applied[i] = [e for e in self.applied.get(i, []) if e.index <= base] if base else []
        self.read_states.setdefault(i, [])

    def add_empty(self, i: int) -> RaftNode:
        """Start a node with no state (a new member that learns everything from the leader)."""
        self.disks[i] = MemoryDisk()
        self.ids.append(i)
        self._start(i)
        return self.nodes[i]

    # --- driving ------------------------------------------------------------------------
    def handle_ready(self, i: int) -> list[Message]:
        node = self.nodes[i]
        if not node.has_ready():
            return []
        rd = node.ready()
        self.disks[i].write(rd)
        if rd.snapshot is not None:
            self.applied[i] = []  # the state machine is replaced by the snapshot's
        self.applied[i].extend(rd.committed_entries)
        self.read_states[i].extend(rd.read_states)
        node.advance(rd)
        return list(rd.messages)

    def flush(self) -> None:
        """Collect every node's Ready into the in-flight queue (no delivery)."""
        for i in self.ids:
            if i not in self.down:
                self.in_flight.extend(self.handle_ready(i))

    def deliver(self, m: Message) -> None:
        if m.to in self.down or m.to not in self.nodes or (m.frm, m.to) in self.cut:
            return
        if self.filter is not None and not self.filter(m):
            return
        self.nodes[m.to].step(m)

    def settle(self, max_rounds: int = 10_000) -> None:
        """Deliver until nothing is in flight and no node has work."""
        for _ in range(max_rounds):
            self.flush()
            if not self.in_flight and not any(
                self.nodes[i].has_ready() for i in self.ids if i not in self.down
            ):
                return
            while self.in_flight:
                self.deliver(self.in_flight.popleft())
        raise RuntimeError("the group did not settle")

    def tick(self, i: int | None = None, n: int = 1) -> None:
        targets = [i] if i is not None else [j for j in self.ids if j not in self.down]
        for _ in range(n):
            for j in targets:
                self.nodes[j].tick()
            self.settle()

    def elect(self, i: int) -> RaftNode:
        """Make node ``i`` time out and settle the election it starts."""
        node = self.nodes[i]
        for _ in range(10 * node.cfg.election_ticks):
            node.tick()
            self.settle()
            if node.is_leader():
                break
        return node

    def leader(self) -> RaftNode | None:
        leaders = [n for i, n in self.nodes.items() if i not in self.down and n.is_leader()]
        if not leaders:
            return None
        return max(leaders, key=lambda n: n.term)

    # --- faults -------------------------------------------------------------------------
    def crash(self, i: int) -> None:
        """Stop node i; whatever it had not persisted is gone."""
        self.down.add(i)

    def restart(self, i: int) -> RaftNode:
        self.down.discard(i)
        self._start(i)
        return self.nodes[i]

    def wipe(self, i: int) -> RaftNode:
        """Node i comes back with no state at all (its replica was dropped, then hosted again)."""
        self.down.discard(i)
        self.disks[i] = MemoryDisk()
        self.applied[i] = []
        self._start(i)
        return self.nodes[i]

    def isolate(self, i: int) -> None:
        for j in self.ids:
            if j != i:
                self.cut.add((i, j))
                self.cut.add((j, i))

    def heal(self) -> None:
        self.cut.clear()

    # --- observations -------------------------------------------------------------------
    def applied_data(self, i: int) -> list:
        return [e.data for e in self.applied[i] if e.kind == EntryKind.NORMAL and e.data is not None]
