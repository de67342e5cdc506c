"""The simulated world: virtual time, a faulty network, per-node disks, Raft nodes and clients.

One ``random.Random(seed)`` decides everything (message delay, loss, duplication and
reordering, partitions, crashes, clock skew, disk latency, client choices), and there are no
threads and no real sleeps, so a seed replays exactly. The Raft code it drives is the real,
unchanged ``pykv.raft.RaftNode``; each node runs the Ready contract against a simulated disk
on which written data stays *unsynced* until its fsync completes: a crash before that cuts
the write at a random point (the un-fsync'd tail is lost) and the node restarts from what
its disk holds.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from pykv.raft import (
    READ_LEASE,
    ConfChange,
    ConfChangeKind,
    ConfChangeRejected,
    Entry,
    EntryKind,
    HardState,
    Message,
    MsgType,
    NotLeader,
    PersistentState,
    RaftConfig,
    RaftNode,
    Ready,
    Role,
    Snapshot,
    bootstrap_state,
)
from pykv.raft.quiescence import NodeLiveness
from pykv.sim.faults import FaultConfig
from pykv.sim.kvsm import KVStateMachine, cas_cmd, probe_cmd, write_cmd
from pykv.sim.linearizability import Op

TICK = 0.1  # virtual seconds per Raft tick (before clock skew)
CLIENT_BASE = 1000  # client endpoint ids start here; nodes are 0..n-1 (and up, when added)


class SimViolation(Exception):
    """A checked property failed; ``kind`` names it and the message explains it."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass
class SimParams:
    """The shape of one run (fault mix apart)."""

    nodes: int = 3
    clients: int = 4
    keys: int = 3
    fault_time: float = 20.0  # virtual seconds of faults before everything heals
    liveness_bound: float = 15.0  # after healing, a proposal must commit within this
    settle_time: float = 3.0  # after liveness, time for stragglers to finish
    compact_every: int = 40  # applied entries between snapshots (when compaction is on)
    op_timeout: float = 3.0  # a client gives up on an operation after this
    attempt_timeout: float = 0.6  # ... and retries it elsewhere after this
    raft: RaftConfig = field(default_factory=lambda: RaftConfig(
        election_ticks=10, heartbeat_ticks=2, max_inflight=16, max_batch_entries=64,
    ))


class Disk:
    """One node's durable state: what survived every completed fsync."""

    __slots__ = ("hard_state", "entries", "snapshot")

    def __init__(self, state: PersistentState | None = None) -> None:
        state = state or PersistentState()
        self.hard_state = state.hard_state
        self.entries: list[Entry] = list(state.entries)
        self.snapshot: Snapshot | None = state.snapshot

    def write(self, rd: Ready, parts: int | None = None) -> None:
        """Make the durable part of ``rd`` stick, in write order; ``parts`` cuts it short.

        Write order is snapshot, then the entries one by one, then the hard state, like a
        log-structured store that appends records in order: a crash keeps a prefix.
        """
        budget = 1 << 30 if parts is None else parts
        if rd.snapshot is not None:
            if budget <= 0:
                return
            budget -= 1
            self.snapshot = rd.snapshot
            self.entries = []
        if rd.entries:
            first = rd.entries[0].index
            keep = rd.entries[: max(0, budget)]
            budget -= len(rd.entries)
            if keep:
                entries = self.entries
                if entries and entries[0].index <= first:
                    del entries[first - entries[0].index :]  # cut the stored log at ``first``
                else:
                    entries.clear()
                entries.extend(keep)
        if rd.hard_state is not None and budget > 0:
            self.hard_state = rd.hard_state

    def write_parts(self, rd: Ready) -> int:
        return (rd.snapshot is not None) + len(rd.entries) + (rd.hard_state is not None)

    def state(self) -> PersistentState:
        return PersistentState(self.hard_state, tuple(self.entries), self.snapshot)


class SimNode:
    """A node's process: its Raft core, state machine and in-memory driver state."""

    def __init__(self, node_id: int, disk: Disk, tick_interval: float) -> None:
        self.id = node_id
        self.disk = disk
        self.tick_interval = tick_interval
        self.raft: RaftNode | None = None
        self.sm = KVStateMachine()
        self.incarnation = 0
        self.writing: Ready | None = None
        self.pending_props: dict[int, tuple[int, int, int]] = {}  # index -> (term, client, seq)
        self.pending_reads: dict[int, tuple[int, int, str]] = {}  # ctx -> (client, seq, key)
        self.waiting_reads: list[tuple[int, int, int, str]] = []
        self.retired = False
        self.crash_armed = False  # crash this node in the middle of its next fsync
        self.sent_early: Ready | None = None  # a Ready whose messages left before its fsync
        self.liveness: NodeLiveness | None = None  # peers heard from (quiesced groups)

    @property
    def up(self) -> bool:
        return self.raft is not None


class Client:
    """One client: a sequence of single-key operations, each retried until it times out."""

    def __init__(self, cid: int, process: int) -> None:
        self.id = cid
        self.process = process
        self.seq = 0
        self.op: dict[str, Any] | None = None
        self.attempt = 0
        self.target: int | None = None


class World:
    """A whole simulated cluster; ``run()`` returns normally or raises SimViolation."""

    def __init__(
        self,
        seed: int,
        faults: FaultConfig,
        params: SimParams | None = None,
        *,
        unsafe_send_before_persist: bool = False,
    ) -> None:
        self.seed = seed
        # A deliberately broken driver (for testing the checks): it sends a Ready's messages
        # as soon as the write starts instead of after the fsync completes.
        self.unsafe_send_before_persist = unsafe_send_before_persist
        # Half of the seeds run the driver with the leader-side optimisation that the Ready
        # contract allows (thesis §10.2.1): a leader whose term is already durable sends its
        # appends while its own write is still in flight.
        self.leader_early_send = (seed // 2) % 2 == 1
        self.faults = faults
        self.params = params or SimParams()
        self.rng = random.Random(seed)
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable, tuple]] = []
        self._seq = 0
        self.trace: deque[tuple] = deque(maxlen=400)
        self.events = 0
        self.messages_sent = 0
        # Quiescence (when the Raft config enables it): the clients pause together now and
        # then, so that groups go idle; how many node-ticks were spent quiesced.
        self.quiet_until = 0.0
        self.quiesced_ticks = 0
        # network state
        self.cut: set[tuple[int, int]] = set()
        self.healed = False
        # checks
        self.leader_of_term: dict[int, int] = {}
        self.committed: dict[int, tuple[int, Any]] = {}  # index -> (term, data) applied anywhere
        # index -> (term of the leader that committed it, the entry's term)
        self.commit_terms: dict[int, tuple[int, int]] = {}
        self.commit_seen = 0
        self.acked: list[tuple[int, int]] = []  # (index, term) of acknowledged proposals
        self.history: list[Op] = []
        self.liveness_at: float | None = None
        self._probe_client = CLIENT_BASE - 1  # the liveness prober's session id
        self._probe_seq = 0
        self._probe_index: tuple[int, int, int] | None = None  # (node, term, index)
        self._done = False
        # nodes
        p = self.params
        if faults.lease_reads:
            self.params = p = replace(p, raft=replace(
                p.raft, read_only=READ_LEASE, max_clock_drift=faults.lease_drift,
            ))
        if not faults.pre_vote or not faults.check_quorum:
            self.params = p = replace(p, raft=replace(
                p.raft, pre_vote=faults.pre_vote, check_quorum=faults.check_quorum,
            ))
        if p.raft.catch_up_entries == 0 and (seed // 4) % 3:
            # Two thirds of the seeds run leaders that keep entries behind their snapshots
            # for lagging followers (a half or twice the compaction interval).
            keep = p.compact_every // 2 if (seed // 4) % 3 == 1 else 2 * p.compact_every
            self.params = p = replace(p, raft=replace(p.raft, catch_up_entries=keep))
        self.voters = list(range(p.nodes))
        boot = bootstrap_state(self.voters)
        self.nodes: dict[int, SimNode] = {}
        for i in self.voters:
            self._add_node(i, Disk(boot))
        self.next_node_id = p.nodes
        # clients
        self.clients: list[Client] = []
        self._next_process = 0
        self._value = 0
        self._read_ctx = 0
        for c in range(p.clients):
            self.clients.append(Client(CLIENT_BASE + c, self._new_process()))

    # ===== event queue =====================================================================
    def at(self, when: float, fn: Callable, *args: Any) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (when, self._seq, fn, args))

    def after(self, delay: float, fn: Callable, *args: Any) -> None:
        self.at(self.now + delay, fn, *args)

    def note(self, kind: str, *detail: Any) -> None:
        self.trace.append((self.now, kind, detail))

    # ===== nodes ===========================================================================
    def _add_node(self, node_id: int, disk: Disk) -> SimNode:
        skew = self.faults.clock_skew
        rate = 1.0 + self.rng.uniform(-skew, skew) if skew else 1.0
        node = SimNode(node_id, disk, TICK * rate)
        self.nodes[node_id] = node
        self._start(node)
        return node

    def _start(self, node: SimNode) -> None:
        node.incarnation += 1
        state = node.disk.state()
        node.raft = RaftNode(
            node.id, state=state, config=self.params.raft,
            rng=random.Random(self.rng.getrandbits(64)),
        )
        node.sm = KVStateMachine()
        if state.snapshot is not None:
            node.sm = KVStateMachine.restore(state.snapshot.data)
        node.writing = None
        node.sent_early = None
        node.pending_props = {}
        node.pending_reads = {}
        node.waiting_reads = []
        node.liveness = NodeLiveness(node.id, self.params.raft.election_ticks)
        self.note("start", node.id, f"term={node.raft.term} last={node.raft.last_index()} "
                                    f"commit={node.raft.commit_index}")
        self.after(self.rng.uniform(0, node.tick_interval), self._tick, node, node.incarnation)

    def _tick(self, node: SimNode, inc: int) -> None:
        if node.incarnation != inc or node.raft is None:
            return
        self._watch_quiesced(node)
        node.raft.tick()
        self._after_input(node)
        self.after(node.tick_interval, self._tick, node, inc)

    def _watch_quiesced(self, node: SimNode) -> None:
        """The node-liveness duty of a driver whose group may quiesce (pykv.raft.quiescence)."""
        liveness, raft = node.liveness, node.raft
        liveness.tick()
        if not raft.quiesced:
            return
        self.quiesced_ticks += 1
        if liveness.now % self.params.raft.heartbeat_ticks:
            return
        if liveness.watch(raft):
            self.note("wake", node.id, f"leader n{raft.leader_id} silent")
        for msg in liveness.keepalives():
            self._send(node.id, msg.to, msg)

    def _after_input(self, node: SimNode) -> None:
        """Run the checks that look at a node right after it changed, then drive its Ready."""
        r = node.raft
        if r.role == Role.LEADER:
            known = self.leader_of_term.get(r.term)
            if known is None:
                self.leader_of_term[r.term] = node.id
                self.note("leader", node.id, f"term={r.term}")
                self._check_leader_completeness(node)
            elif known != node.id:
                raise SimViolation(
                    "election safety", f"nodes {known} and {node.id} both lead term {r.term}",
                )
            self._note_commit(node)
        self._pump(node)

    def _note_commit(self, node: SimNode) -> None:
        """Record in which term each entry was first committed (by a leader's count)."""
        r = node.raft
        c = r.commit_index
        if c > self.commit_seen:
            for index in range(max(self.commit_seen, r.log.offset) + 1, c + 1):
                self.commit_terms[index] = (r.term, r.log.term(index))
            self.commit_seen = c

    def _pump(self, node: SimNode) -> None:
        r = node.raft
        while r is not None and node.writing is None and r.has_ready():
            rd = r.ready()
            if rd.must_sync():
                node.writing = rd
                if self.unsafe_send_before_persist or (
                    self.leader_early_send and r.role == Role.LEADER and (
                        rd.hard_state is None
                        or (rd.hard_state.term, rd.hard_state.vote)
                        == (node.disk.hard_state.term, node.disk.hard_state.vote)
                    )
                ):
                    node.sent_early = rd
                    for m in rd.messages:
                        self._send(node.id, m.to, m)
                latency = self._fsync_latency()
                self.after(latency, self._fsync_done, node, node.incarnation)
                if node.crash_armed:
                    node.crash_armed = False
                    self.after(self.rng.uniform(0, latency), self._crash_now, node, node.incarnation)
                return
            self._finish_ready(node, rd)

    def _fsync_latency(self) -> float:
        if self.faults.slow_disk and not self.healed and self.rng.random() < self.faults.slow_disk:
            return self.rng.uniform(0.05, 0.5)
        return self.rng.uniform(0.0002, 0.002)

    def _fsync_done(self, node: SimNode, inc: int) -> None:
        if node.incarnation != inc or node.raft is None:
            return
        rd = node.writing
        node.writing = None
        # Ready contract step 1 is now complete: the data is durable.
        node.disk.write(rd)
        self._finish_ready(node, rd)
        self._pump(node)

    def _finish_ready(self, node: SimNode, rd: Ready) -> None:
        r = node.raft
        # Step 2: send (unless the leader optimisation already did).
        if node.sent_early is rd:
            node.sent_early = None
        else:
            for m in rd.messages:
                self._send(node.id, m.to, m)
        # Step 3: apply.
        if rd.snapshot is not None:
            node.sm = KVStateMachine.restore(rd.snapshot.data)
            node.pending_props = {i: p for i, p in node.pending_props.items()
                                  if i > rd.snapshot.meta.index}
            self.note("install", node.id, f"snapshot@{rd.snapshot.meta.index}")
        for e in rd.committed_entries:
            self._apply(node, e)
        for rs in rd.read_states:
            req = node.pending_reads.pop(rs.context, None)
            if req is not None:
                node.waiting_reads.append((rs.index, *req))
        self._serve_reads(node)
        # Step 4: advance.
        r.advance(rd)
        if r.role == Role.LEADER:
            self._note_commit(node)  # a leader's own fsync can complete a commit quorum
        self._maybe_compact(node)

    def _apply(self, node: SimNode, e: Entry) -> None:
        if e.index != node.sm.applied + 1:
            raise SimViolation(
                "apply order", f"node {node.id} applied {e.index} after {node.sm.applied}",
            )
        seen = self.committed.get(e.index)
        data = e.data
        if seen is None:
            self.committed[e.index] = (e.term, data)
        elif seen[0] != e.term or seen[1] != data:
            raise SimViolation(
                "state machine safety",
                f"node {node.id} applied {e.term}/{data!r} at index {e.index}, "
                f"another node applied {seen[0]}/{seen[1]!r}",
            )
        result = node.sm.apply(e.index, data if e.kind == EntryKind.NORMAL else None)
        pending = node.pending_props.pop(e.index, None)
        if pending is not None:
            term, cid, seq = pending
            if term == e.term:
                self.acked.append((e.index, e.term))
                self._send(node.id, cid, ("ok", seq, result))
            else:
                self._send(node.id, cid, ("fail", seq, node.raft.leader_id))

    def _serve_reads(self, node: SimNode) -> None:
        if not node.waiting_reads:
            return
        keep = []
        for index, cid, seq, key in node.waiting_reads:
            if node.sm.applied >= index:
                self._send(node.id, cid, ("ok", seq, node.sm.read(key)))
            else:
                keep.append((index, cid, seq, key))
        node.waiting_reads = keep

    def _maybe_compact(self, node: SimNode) -> None:
        r = node.raft
        if (
            not self.faults.compaction
            or node.writing is not None
            or node.sm.applied - r.log.snapshot.meta.index < self.params.compact_every
        ):
            return
        index = node.sm.applied
        r.compact(index, node.sm.snapshot())
        # The snapshot is durable before the log prefix goes (one atomic step here).
        node.disk.snapshot = r.log.snapshot
        node.disk.entries = [e for e in node.disk.entries if e.index > index]
        self.note("compact", node.id, f"@{index}")

    # ===== network =========================================================================
    def _send(self, frm: int, to: int, payload: Any) -> None:
        self.messages_sent += 1
        if isinstance(payload, Message) and frm in self.nodes:
            self._check_durable_when_sent(self.nodes[frm], payload)
        if (frm, to) in self.cut:
            return
        f = self.faults
        net_faults = not self.healed
        if net_faults and f.loss and self.rng.random() < f.loss:
            return
        delay = self.rng.uniform(0.0005, 0.005)
        if net_faults and f.reorder and self.rng.random() < f.reorder:
            delay += self.rng.uniform(0, f.reorder_delay)
        self.at(self.now + delay, self._deliver, frm, to, payload)
        if net_faults and f.duplicate and self.rng.random() < f.duplicate:
            self.at(self.now + delay + self.rng.uniform(0, 0.05), self._deliver, frm, to, payload)

    @staticmethod
    def _check_durable_when_sent(node: SimNode, m: Message) -> None:
        """The Ready contract as the network sees it: a node acknowledges only entries on its
        disk, and grants only a vote its disk records. (A leader learns only later, if at all,
        that a follower lost what it acknowledged and catches it up: this sees a driver that
        sends first when it does.)"""
        disk = node.disk
        if m.type == MsgType.APP_RESP and not m.reject:
            durable = disk.entries[-1].index if disk.entries else (disk.snapshot.meta.index if disk.snapshot else 0)
            if m.index > durable:
                raise SimViolation("durability", f"n{node.id} acknowledged entry {m.index} "
                                                 f"with only {durable} on its disk")
        elif m.type == MsgType.VOTE_RESP and not m.reject:
            recorded = (disk.hard_state.term, disk.hard_state.vote)
            if recorded != (m.term, m.to):
                raise SimViolation("election safety", f"n{node.id} granted its vote in term {m.term} "
                                                      f"to n{m.to} with {recorded} on its disk")

    def _deliver(self, frm: int, to: int, payload: Any) -> None:
        if to >= CLIENT_BASE:
            self._client_response(self.clients[to - CLIENT_BASE], frm, payload)
            return
        node = self.nodes.get(to)
        if node is None or node.raft is None:
            return
        if isinstance(payload, Message):
            if node.liveness.heard(frm) and NodeLiveness.returned(frm, [node.raft]):
                self.note("wake", to, f"n{frm} is back")
            if payload.type == MsgType.KEEPALIVE:
                return
            self.note("recv", to, payload)
            node.raft.step(payload)
            self._after_input(node)
        else:
            self._client_request(node, frm, payload)

    # ===== node side of the client protocol ===============================================
    def _client_request(self, node: SimNode, cid: int, req: tuple) -> None:
        kind, seq = req[0], req[1]
        r = node.raft
        try:
            if kind == "read":
                self._read_ctx += 1
                ctx = self._read_ctx
                r.read_index(ctx)
                node.pending_reads[ctx] = (cid, seq, req[2])
            else:
                term, index = r.propose(req[2])
                node.pending_props[index] = (term, cid, seq)
        except NotLeader as exc:
            self._send(node.id, cid, ("fail", seq, exc.leader_hint))
            return
        self._after_input(node)

    # ===== clients ==========================================================================
    def _new_process(self) -> int:
        self._next_process += 1
        return self._next_process

    def _client_next(self, c: Client) -> None:
        if self.healed and self.liveness_at is not None:
            return  # the run is winding down
        if self.now < self.quiet_until:
            self.at(self.quiet_until + self.rng.uniform(0.0, 0.05), self._client_next, c)
            return
        c.seq += 1
        key = f"k{self.rng.randrange(self.params.keys)}"
        roll = self.rng.random()
        if roll < 0.4:
            op = {"kind": "read", "key": key, "req": ("read", c.seq, key)}
        elif roll < 0.8:
            self._value += 1
            v = self._value
            op = {"kind": "write", "key": key, "value": v,
                  "req": ("w", c.seq, write_cmd(c.id, c.seq, key, v))}
        else:
            self._value += 1
            expected = self.rng.choice([None, *range(max(1, self._value - 6), self._value)])
            v = self._value
            op = {"kind": "cas", "key": key, "value": (expected, v),
                  "req": ("cas", c.seq, cas_cmd(c.id, c.seq, key, expected, v))}
        op["call"] = self.now
        op["seq"] = c.seq
        c.op = op
        self._client_attempt(c)
        self.after(self.params.op_timeout, self._client_give_up, c, c.seq)

    def _client_attempt(self, c: Client) -> None:
        op = c.op
        if op is None:
            return
        c.attempt += 1
        if c.target is None or c.target not in self.nodes:
            c.target = self.rng.choice(self._members())
        self.note("client", c.id, f"attempt {op['kind']} seq={op['seq']} -> n{c.target}")
        self._send(c.id, c.target, op["req"])
        self.after(self.params.attempt_timeout, self._client_retry, c, op["seq"], c.attempt)

    def _client_retry(self, c: Client, seq: int, attempt: int) -> None:
        if c.op is None or c.op["seq"] != seq or c.attempt != attempt:
            return
        c.target = None  # try someone else
        self._client_attempt(c)

    def _client_response(self, c: Client, frm: int, resp: tuple) -> None:
        status, seq, value = resp
        op = c.op
        if op is None or op["seq"] != seq:
            return
        if status == "fail":
            # Definitely not applied through that node: retry, at the hinted leader if any.
            c.target = value if value is not None and value in self.nodes else None
            self.after(0.01, self._client_retry, c, seq, c.attempt)
            return
        output = value if op["kind"] != "write" else None
        self.history.append(Op(c.process, op["kind"], op["key"], op.get("value"), output,
                               op["call"], self.now))
        self.note("client", c.id, f"done {op['kind']} {op['key']} {op.get('value')} -> {output}")
        c.op = None
        # Mostly stay with the node that answered; sometimes wander, so that reads also land
        # on nodes that merely believe they lead (a deposed leader is where stale reads hide).
        c.target = frm if self.rng.random() < 0.7 else None
        self.after(self.rng.uniform(0.0, 0.05), self._client_next, c)

    def _client_give_up(self, c: Client, seq: int) -> None:
        op = c.op
        if op is None or op["seq"] != seq:
            return
        if op["kind"] != "read":
            # Outcome unknown: it may still take effect, so it stays in the history open-ended,
            # and this process never issues another operation (a fresh one takes over).
            self.history.append(Op(c.process, op["kind"], op["key"], op.get("value"), None,
                                   op["call"], None))
            c.process = self._new_process()
        self.note("client", c.id, f"gave up {op['kind']} seq={seq}")
        c.op = None
        self.after(0.01, self._client_next, c)

    # ===== faults ==========================================================================
    def _quiet_phase(self) -> None:
        """Every client pauses for a while, long enough for idle groups to quiesce."""
        if self.healed:
            return
        quiet = self.rng.uniform(1.5, 4.0) + self.params.raft.quiesce_ticks * TICK
        self.quiet_until = self.now + quiet
        self.note("quiet", None, f"clients pause {quiet:.1f} s")
        self.after(quiet + self.rng.uniform(1.0, 3.0), self._quiet_phase)

    def _schedule_faults(self) -> None:
        f, T = self.faults, self.params.fault_time
        if f.partitions:
            self.at(self.rng.uniform(0.5, 3.0), self._partition)
        if f.crashes:
            self.at(self.rng.uniform(1.0, 4.0), self._crash)
        if f.transfers:
            self.at(self.rng.uniform(2.0, 6.0), self._transfer)
        if f.membership:
            self.at(self.rng.uniform(2.0, 5.0), self._membership)
        self.at(T, self._heal)

    def _members(self) -> list[int]:
        return sorted(i for i, n in self.nodes.items() if not n.retired)

    def _partition(self) -> None:
        if self.healed:
            return
        ids = self._members()
        self.cut.clear()
        shape = self.rng.random()
        if shape < 0.4:  # symmetric split into two sides
            self.rng.shuffle(ids)
            k = self.rng.randrange(1, len(ids))
            a, b = ids[:k], ids[k:]
            for x in a:
                for y in b:
                    self.cut.add((x, y))
                    self.cut.add((y, x))
            desc = f"split {sorted(a)} | {sorted(b)}"
        elif shape < 0.7:  # one-way: a node can send but not hear (or the reverse)
            x = self.rng.choice(ids)
            inbound = self.rng.random() < 0.5
            for y in ids:
                if y != x:
                    self.cut.add((y, x) if inbound else (x, y))
            desc = f"one-way {'into' if inbound else 'out of'} n{x}"
        else:  # a bridge: two halves that only one node can talk to
            self.rng.shuffle(ids)
            bridge, rest = ids[0], ids[1:]
            half = len(rest) // 2
            a, b = rest[:half], rest[half:]
            for x in a:
                for y in b:
                    self.cut.add((x, y))
                    self.cut.add((y, x))
            desc = f"bridge n{bridge} between {sorted(a)} and {sorted(b)}"
        self.note("partition", None, desc)
        self.after(self.rng.uniform(0.5, 4.0), self._heal_partition)

    def _heal_partition(self) -> None:
        if self.healed:
            return
        self.cut.clear()
        self.note("partition", None, "healed")
        self.after(self.rng.uniform(0.5, 4.0), self._partition)

    def _crash(self) -> None:
        if self.healed:
            return
        up = [i for i in self._members() if self.nodes[i].up]
        if up:
            victim = self.rng.choice(up)
            if self.rng.random() < 0.7:
                # Most crashes strike during an fsync, where persist-before-send bugs live.
                self.nodes[victim].crash_armed = True
            else:
                self.crash(victim)
        self.after(self.rng.uniform(0.3, 2.5), self._crash)

    def _crash_now(self, node: SimNode, inc: int) -> None:
        if node.incarnation == inc and node.raft is not None and not self.healed:
            self.crash(node.id)

    def crash(self, node_id: int) -> None:
        node = self.nodes[node_id]
        lost = ""
        if node.writing is not None:
            rd = node.writing
            total = node.disk.write_parts(rd)
            kept = self.rng.randrange(total + 1)
            node.disk.write(rd, parts=kept)
            lost = f", kept {kept}/{total} parts of an unsynced write"
        node.raft = None
        node.writing = None
        node.crash_armed = False
        node.incarnation += 1
        self.note("crash", node_id, f"disk last={node.disk.entries[-1].index if node.disk.entries else 0}{lost}")
        # Some restarts are immediate (a supervisor restarting the process within
        # milliseconds): that is when a forgotten vote or acknowledgement can still matter.
        delay = self.rng.uniform(0.001, 0.02) if self.rng.random() < 0.3 else self.rng.uniform(0.2, 3.0)
        self.after(delay, self._restart, node, node.incarnation)

    def _restart(self, node: SimNode, inc: int) -> None:
        if node.incarnation != inc or node.raft is not None or node.retired:
            return
        self._start(node)

    def _leader(self) -> SimNode | None:
        best = None
        for n in self.nodes.values():
            if n.raft is not None and n.raft.is_leader():
                if best is None or n.raft.term > best.raft.term:
                    best = n
        return best

    def _transfer(self) -> None:
        if self.healed:
            return
        leader = self._leader()
        if leader is not None:
            voters = sorted(v for v in leader.raft.conf.voters if v != leader.id)
            if voters:
                to = self.rng.choice(voters)
                self.note("transfer", leader.id, f"to n{to}")
                leader.raft.transfer_leadership(to)
                self._after_input(leader)
        self.after(self.rng.uniform(2.0, 6.0), self._transfer)

    def _membership(self) -> None:
        if self.healed:
            return
        self.after(self.rng.uniform(1.0, 4.0), self._membership)
        leader = self._leader()
        if leader is None:
            return
        r = leader.raft
        conf = r.conf
        try:
            if conf.learners:
                learner = min(conf.learners)
                self.note("membership", leader.id, f"promote n{learner}")
                r.propose_conf_change(ConfChange.single(ConfChangeKind.ADD_NODE, learner))
            elif len(conf.voters) > 3 and self.rng.random() < 0.5:
                victim = self.rng.choice(sorted(conf.voters))
                self.note("membership", leader.id, f"remove n{victim}")
                r.propose_conf_change(ConfChange.single(ConfChangeKind.REMOVE_NODE, victim))
                self.after(self.rng.uniform(2.0, 5.0), self._maybe_retire, victim)
            elif len(conf.voters) < 6:
                new_id = self.next_node_id
                r.propose_conf_change(ConfChange.single(ConfChangeKind.ADD_LEARNER, new_id))
                self.next_node_id += 1
                self._add_node(new_id, Disk())
                self.note("membership", leader.id, f"add learner n{new_id}")
        except (ConfChangeRejected, NotLeader) as exc:
            self.note("membership", leader.id, f"rejected: {exc}")
            return
        self._after_input(leader)

    def _maybe_retire(self, node_id: int) -> None:
        """Shut down a removed node once some live member's committed config excludes it."""
        node = self.nodes[node_id]
        for n in self.nodes.values():
            r = n.raft
            if r is not None and r.is_leader() and node_id not in r.conf.members() \
                    and r.conf_committed():
                node.retired = True
                node.raft = None
                node.incarnation += 1
                self.note("retire", node_id, "removed from the group; shut down")
                return
        if not self.healed:
            self.after(1.0, self._maybe_retire, node_id)

    def _heal(self) -> None:
        self.healed = True
        self.cut.clear()
        self.note("heal", None, "faults off: network healed, every node restarted")
        for node in self.nodes.values():
            if node.raft is None and not node.retired:
                self._start(node)
        self._probe_attempt()
        self.at(self.now + self.params.liveness_bound, self._liveness_deadline)

    def _probe_attempt(self) -> None:
        """After healing: keep proposing a probe command until one commits (liveness)."""
        if self.liveness_at is not None:
            return
        leader = self._leader()
        if leader is not None:
            self._probe_seq += 1
            try:
                term, index = leader.raft.propose(probe_cmd(self._probe_client, self._probe_seq))
                self._probe_index = (leader.id, term, index)
                self._after_input(leader)
            except NotLeader:
                pass
        self.after(0.2, self._probe_check)

    def _probe_check(self) -> None:
        if self.liveness_at is not None:
            return
        probe = self._probe_index
        if probe is not None:
            _, term, index = probe
            seen = self.committed.get(index)
            if seen is not None and seen[0] == term:
                self.liveness_at = self.now
                self.note("liveness", None, f"probe committed at index {index}")
                self.at(self.now + self.params.settle_time, self._finish)
                return
        self._probe_attempt()

    def _liveness_deadline(self) -> None:
        if self.liveness_at is None:
            raise SimViolation(
                "liveness",
                f"no proposal committed within {self.params.liveness_bound}s of virtual time "
                f"after the network healed (leader: {self._leader() and self._leader().id})",
            )

    def _finish(self, deadline: float | None = None) -> None:
        """End the run once a leader stands and every member has caught up.

        A run without pre-vote may be mid-election at the end of its settle time (a node that
        was cut off can depose a healthy leader on its return), so wait for the group to
        settle, up to the liveness bound; the final checks then explain what did not.
        """
        if deadline is None:
            deadline = self.now + self.params.liveness_bound
        if self.now >= deadline or self._settled():
            self._done = True
            return
        self.after(0.1, self._finish, deadline)

    def _settled(self) -> bool:
        leader = self._leader()
        if leader is None:
            return False
        newest = max((index for index, _ in self.acked), default=0)
        for node_id in leader.raft.conf.members():
            node = self.nodes.get(node_id)
            if node is not None and node.raft is not None and node.sm.applied < newest:
                return False
        return True

    # ===== checks ==========================================================================
    def _check_leader_completeness(self, node: SimNode) -> None:
        """A leader of term T holds every entry committed in a term before T (§5.4).

        Only earlier terms: a candidate of an old term whose votes arrive late may still win
        that old term after a later term committed entries it lacks (found by the simulator,
        seed 339687 of the chaos mix, as a false alarm of an earlier version of this check).
        """
        r = node.raft
        for index, (commit_term, entry_term) in self.commit_terms.items():
            if commit_term >= r.term or index <= r.log.offset:
                continue
            if r.log.term(index) != entry_term:
                raise SimViolation(
                    "leader completeness",
                    f"n{node.id} leads term {r.term} without entry {index} (term {entry_term}), "
                    f"committed in term {commit_term}; it has term {r.log.term(index)} there",
                )

    def check_log_matching(self) -> None:
        live = [n for n in self.nodes.values() if n.raft is not None]
        for i, a in enumerate(live):
            for b in live[i + 1 :]:
                la, lb = a.raft.log, b.raft.log
                lo = max(la.offset, lb.offset) + 1
                hi = min(la.last_index(), lb.last_index())
                agreed = False
                for index in range(hi, lo - 1, -1):
                    ea, eb = la.entry(index), lb.entry(index)
                    if agreed or ea.term == eb.term:
                        agreed = True
                        if ea != eb:
                            raise SimViolation(
                                "log matching",
                                f"n{a.id} and n{b.id} agree on a later entry but differ at "
                                f"{index}: {ea} vs {eb}",
                            )

    def _periodic_check(self) -> None:
        self.check_log_matching()
        if not self._done:
            self.after(2.0, self._periodic_check)

    def final_checks(self) -> None:
        self.check_log_matching()
        leader = self._leader()
        if leader is None:
            raise SimViolation("liveness", "no leader at the end of the run")
        # Every member has caught up with every acknowledged entry (and applied exactly what
        # the others applied there: the state machine safety check ran on each apply).
        newest = max((index for index, _ in self.acked), default=0)
        for node_id in sorted(leader.raft.conf.members()):
            node = self.nodes.get(node_id)
            if node is not None and node.raft is not None and node.sm.applied < newest:
                raise SimViolation(
                    "durability",
                    f"n{node_id} applied only up to {node.sm.applied} after the run settled; "
                    f"entry {newest} was acknowledged",
                )
        for index, term in self.acked:
            seen = self.committed.get(index)
            if seen is None or seen[0] != term:
                raise SimViolation("durability", f"acknowledged entry {index}/{term} was lost")
            lt = leader.raft.log.term(index)
            if index > leader.raft.log.offset and lt != term:
                raise SimViolation(
                    "durability", f"leader n{leader.id} has term {lt} at acknowledged {index}",
                )

    # ===== running ==========================================================================
    def run(self) -> None:
        """Run to the end of the seed; raises SimViolation on the first failed check."""
        self._schedule_faults()
        if self.params.raft.quiesce_ticks:
            self.at(self.rng.uniform(1.0, 3.0), self._quiet_phase)
        for c in self.clients:
            self.at(self.rng.uniform(0, 0.5), self._client_next, c)
        self.at(2.0, self._periodic_check)
        queue = self._queue
        limit = self.params.fault_time + 2 * self.params.liveness_bound + self.params.settle_time + 5
        while queue and not self._done:
            when, _, fn, args = heapq.heappop(queue)
            self.now = when
            self.events += 1
            fn(*args)
            if when > limit:
                break
        self._close_history()
        self.final_checks()

    def _close_history(self) -> None:
        """Operations still under way at the end have unknown outcomes; they stay in the history."""
        for c in self.clients:
            op = c.op
            if op is not None and op["kind"] != "read":
                self.history.append(Op(c.process, op["kind"], op["key"], op.get("value"), None,
                                       op["call"], None))
            c.op = None

    def durable_hard_states(self) -> dict[int, HardState]:
        return {i: n.disk.hard_state for i, n in self.nodes.items()}
