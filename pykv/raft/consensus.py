"""ConsensusModule: a real Raft group run in-process with threads, real timers and a transport.

This is the one module of pykv/raft/ allowed threads and a clock (tests/test_layers.py
exempts it): it drives the pure ``RaftNode`` core with wall-clock ticks, and is what an
application uses to replicate commands without writing its own driver:

    group = ConsensusModule.in_memory(nodes=3)
    group.propose(b"cmd")                 # True once committed and applied
    group.get_committed_transactions()    # [b"cmd"]
    group.crash(0); group.restart(0); group.partition([[0], [1, 2]]); group.partition([])
    group.close()

Each replica is one thread that owns its RaftNode and follows the Ready contract (see
pykv.raft.node): persist to its store, then send, then apply, then advance. The in-memory
store keeps what a replica persisted across crash() and restart(), as a disk would.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from typing import Any

from pykv.codec import pack, unpack
from pykv.errors import Error, InvalidArgument
from pykv.raft.errors import NotLeader
from pykv.raft.harness import MemoryDisk
from pykv.raft.messages import EntryKind, Message, Role
from pykv.raft.node import RaftConfig, RaftNode, bootstrap_state

_STOP = object()


class UnknownNode(Error, ValueError):
    """A node id that is not part of the group."""


class _Replica:
    """One replica: a thread, its RaftNode, its store, its inbox and what it applied."""

    def __init__(self, group: ConsensusModule, node_id: int, disk: MemoryDisk) -> None:
        self.group = group
        self.id = node_id
        self.disk = disk
        self.inbox: queue.Queue = queue.Queue()
        self.node: RaftNode | None = None
        self.thread: threading.Thread | None = None
        self.applied: list[Any] = []  # commands this replica applied, in order
        self.running = False

    def start(self) -> None:
        self.inbox = queue.Queue()
        self.node = RaftNode(
            self.id, state=self.disk.state(), config=self.group.config,
            rng=random.Random(self.group.rng.getrandbits(64)),
        )
        self.applied = []  # the state machine is rebuilt by replaying the committed log
        self.running = True
        self.thread = threading.Thread(
            target=self._run, name=f"raft-replica-{self.id}", daemon=True,
        )
        self.thread.start()

    def stop(self) -> None:
        """Crash: the thread stops; only what was persisted survives."""
        if not self.running:
            return
        self.running = False
        self.inbox.put(_STOP)
        if self.thread is not None:
            self.thread.join()
        self.node = None
        self._fail_pending_calls()

    def call(self, fn) -> Future:
        fut: Future = Future()
        if not self.running:
            fut.set_exception(NotLeader(None, f"replica {self.id} is down"))
            return fut
        self.inbox.put(("call", fn, fut))
        return fut

    def _fail_pending_calls(self) -> None:
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, tuple) and item[0] == "call":
                item[2].set_exception(NotLeader(None, f"replica {self.id} crashed"))

    def _run(self) -> None:
        node = self.node
        interval = self.group.tick_interval
        next_tick = time.monotonic() + interval
        while True:
            wait = next_tick - time.monotonic()
            if wait <= 0:
                node.tick()
                next_tick += interval
                if next_tick < time.monotonic():
                    next_tick = time.monotonic() + interval  # we fell behind: do not burst
            else:
                try:
                    item = self.inbox.get(timeout=wait)
                except queue.Empty:
                    item = None
                # Take everything already queued so one Ready (one persist) covers it all.
                while item is not None:
                    if item is _STOP:
                        self._fail_pending_calls()
                        return
                    self._handle(node, item)
                    try:
                        item = self.inbox.get_nowait()
                    except queue.Empty:
                        item = None
            self._process_ready(node)

    def _handle(self, node: RaftNode, item: tuple) -> None:
        if item[0] == "msg":
            node.step(Message.from_wire(unpack(item[1])))
        else:
            _, fn, fut = item
            try:
                fut.set_result(fn(node))
            except Exception as exc:  # handed back to the calling thread
                fut.set_exception(exc)

    def _process_ready(self, node: RaftNode) -> None:
        while node.has_ready():
            rd = node.ready()
            # 1. persist (the in-memory store stands in for write + fsync)
            self.disk.write(rd)
            # 2. send
            for m in rd.messages:
                self.group._deliver(self.id, m.to, pack(m.to_wire()))
            # 3. apply
            for e in rd.committed_entries:
                if e.kind == EntryKind.NORMAL and e.data is not None:
                    self.applied.append(e.data)
                self.group._committed(self.id, e.index, e.term, e.kind, e.data)
            # 4. advance
            node.advance(rd)


class ConsensusModule:
    """A Raft group of in-process replicas with a blocking propose() API."""

    def __init__(
        self,
        nodes: int = 3,
        *,
        tick_interval: float = 0.01,
        config: RaftConfig | None = None,
        seed: int | None = None,
    ) -> None:
        if nodes < 1:
            raise InvalidArgument("a group needs at least one replica")
        self.config = config or RaftConfig(election_ticks=10, heartbeat_ticks=2)
        self.tick_interval = tick_interval
        self.rng = random.Random(seed)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._log: dict[int, tuple[int, int, Any]] = {}  # index -> (term, kind, data)
        self.safety_violations: list[str] = []
        self._links: set[tuple[int, int]] | None = None  # None: everyone talks to everyone
        boot = bootstrap_state(range(nodes))
        self._replicas = [
            _Replica(self, i, MemoryDisk(boot.hard_state, list(boot.entries), None))
            for i in range(nodes)
        ]
        for r in self._replicas:
            r.start()

    @classmethod
    def in_memory(cls, nodes: int = 3, **kwargs: Any) -> ConsensusModule:
        """A group of ``nodes`` replicas (ids 0 … nodes−1) over an in-memory transport."""
        return cls(nodes, **kwargs)

    def __enter__(self) -> ConsensusModule:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the application API ----------------------------------------------------------
    def propose(self, command: Any, timeout: float = 5.0, *, node: int | None = None) -> bool:
        """Replicate ``command``; True once it is committed and applied.

        False when it is known not to have committed (the leader that took it lost its
        leadership and the log moved on without it) or when ``timeout`` seconds pass first
        (then it may still commit later). ``node`` pins the proposal to one replica (which
        must be the leader) instead of following the current leader. ``command`` must be
        msgpack-encodable (bytes, str, int, lists and dicts of those).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            replica = self._replica(node) if node is not None else self._likely_leader()
            if replica is None:
                time.sleep(self.tick_interval)
                continue
            fut = replica.call(lambda n: n.propose(command))
            try:
                term, index = fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except NotLeader:
                time.sleep(self.tick_interval)
                continue
            except TimeoutError:
                return False
            return self._wait_committed(term, index, deadline)
        return False

    def _wait_committed(self, term: int, index: int, deadline: float) -> bool:
        with self._cond:
            while index not in self._log:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return self._log[index][0] == term

    def get_committed_transactions(self, node: int | None = None) -> list[Any]:
        """The committed commands in log order (as applied by ``node``, if given)."""
        if node is not None:
            return list(self._replica(node).applied)
        with self._lock:
            return [
                data for _, (_, kind, data) in sorted(self._log.items())
                if kind == EntryKind.NORMAL and data is not None
            ]

    def leader(self) -> int | None:
        """The id of the replica that currently leads (highest term), or None."""
        r = self._likely_leader()
        return None if r is None else r.id

    # --- faults -----------------------------------------------------------------------
    def crash(self, node: int) -> None:
        """Stop replica ``node`` as a crash would: only what it persisted survives."""
        self._replica(node).stop()

    def restart(self, node: int) -> None:
        """Start a crashed replica again from what it persisted."""
        r = self._replica(node)
        if not r.running:
            r.start()

    def partition(self, groups: Sequence[Iterable[int]]) -> None:
        """Let replicas talk only within their group; ``partition([])`` heals everything.

        A replica listed in no group is cut off from everyone.
        """
        if not groups:
            self._links = None
            return
        links = set()
        for g in groups:
            members = list(g)
            for a in members:
                self._replica(a)
                for b in members:
                    links.add((a, b))
        self._links = links

    def close(self) -> None:
        for r in self._replicas:
            r.stop()

    # --- internals --------------------------------------------------------------------
    def _replica(self, node: int) -> _Replica:
        if not isinstance(node, int) or not 0 <= node < len(self._replicas):
            raise UnknownNode(f"no replica {node!r}; ids are 0..{len(self._replicas) - 1}")
        return self._replicas[node]

    def _likely_leader(self) -> _Replica | None:
        best = None
        for r in self._replicas:
            n = r.node
            if r.running and n is not None and n.role == Role.LEADER:
                if best is None or n.term > best.node.term:
                    best = r
        return best

    def _deliver(self, frm: int, to: int, wire: bytes) -> None:
        links = self._links
        if links is not None and (frm, to) not in links:
            return
        if 0 <= to < len(self._replicas):
            r = self._replicas[to]
            if r.running:
                r.inbox.put(("msg", wire))

    def _committed(self, node: int, index: int, term: int, kind: int, data: Any) -> None:
        with self._cond:
            seen = self._log.get(index)
            if seen is None:
                self._log[index] = (term, kind, data)
                self._cond.notify_all()
            elif seen[0] != term or seen[2] != data:
                self.safety_violations.append(
                    f"replica {node} applied {term}/{data!r} at {index}, another {seen}"
                )
