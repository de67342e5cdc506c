"""A simulated cluster for transactions: real shard replicas and two-phase commit under faults.

``pykv.sim.world`` proves Raft with a toy state machine. This world drives what a node runs
above Raft: on every node a ``pykv.replica.host.ReplicaHost`` hosting the shard groups the
map places there (every one, unless a mix sets fewer replicas and moves them about as the
metadata leader does: ``_mover``), each replica a real ``pykv.replica.shard.ShardState`` (OCC validation, prepared locks, the
coordinator shard's decision, snapshots). Clients run list-append transactions (read two
lists, append a unique element to each) and commit them as ``pykv.client.cluster`` does:
one COMMIT on a single shard, else PREPARE on the other participants, COMMIT_DECIDE on the
coordinator shard, whose leader then sends FINISH (``Node._finish_decided``) and releases
the commit once every participant applied it, sending FINISH again for commits left
unfinished (``Node._sweep``); nodes settle prepared transactions whose
coordinator went quiet as ``Node._settle`` does (DECIDE abort, then FINISH with what the
coordinator shard recorded). A scanner takes consistent scans of
every list as ``KeyValueStore.scan`` does (``ScanPasses``: passes over every shard until two
agree), and a snapshotter reads some lists as ``KeyValueStore.get_many`` does
(``snapshot_rounds``), both recorded as read-only transactions. Requests travel through the same faulty network
as Raft's messages and are retried at the leader a redirect names.

One ``random.Random(seed)`` decides delays, loss, partitions, crashes, client choices and
clients that vanish between their prepares and their decision; time is virtual and a seed
replays exactly. A node's disk keeps what its driver persisted (the Raft world covers torn
fsyncs of the Raft log); a crash loses the node's memory: its Raft state, shard state
machines and everything in flight. With stored shards some crashes are power losses: each
shard's storage (fsync off) keeps only what it fdatasync'd and a random prefix of the rest;
that mix also compacts random replicas at whatever index they have applied (some nodes
crash right after) and transfers the leadership of random groups.

Checked after the faults heal and the cluster settles: the history of every transaction
whose client learned its fate, and of those it did not, is strictly serializable
(``pykv.sim.listappend``), every group is where the map places it, no replica still holds
a prepared transaction or an unreleased commit, and the replicas of every shard hold the
same versions.
"""

from __future__ import annotations

import contextlib
import heapq
import random
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from pykv._engine.wal import HEADER_SIZE, read_wal
from pykv.cluster.shardmap import Step, StepKind, next_step
from pykv.errors import Error, Timeout, TransactionConflict, Unavailable, by_name
from pykv.raft import Message, RaftConfig
from pykv.raft.errors import NotLeader
from pykv.raft.log import cut_from, cut_through
from pykv.raft.messages import HardState, PersistentState, Snapshot
from pykv.replica.commitflow import (
    BACKUP_ATTEMPTS,
    BACKUP_PAUSE,
    BACKUP_RETRIED,
    EXPORT,
    EXPORT_CALL_ATTEMPTS,
    READ,
    SCAN,
    ExportPass,
    Round,
    Scanned,
    Send,
    commit_rounds,
    export_pages,
    export_rounds,
    holders,
    read_batches,
    scan_rounds,
    snapshot_rounds,
    stream_scan_rounds,
)
from pykv.replica.durable import GroupWork
from pykv.replica.finishing import FinishTracker, Orphans, orphans_to_settle, sweep
from pykv.replica.host import ReplicaHost
from pykv.replica.shard import (
    COMMIT,
    COMMIT_DECIDE,
    DECIDE,
    FINISH,
    PREPARE,
    RELEASE,
    Prepared,
    ShardState,
    recorded_decision,
    scan_reply,
    written_keys,
)
from pykv.replica.stored import StoredShardState
from pykv.sim.listappend import Txn, check_serializable
from pykv.txn.model import (
    EVERY_KEY,
    PASSES_BEFORE_LOCKING,
    CommitRequest,
    KeyRange,
    Versioned,
    WriteOp,
)
from pykv.types import OpKind

TICK = 0.01  # virtual seconds per Raft tick
# The requests of placement work besides the shard commands (the node's MEMBERS, CONF,
# HOST and DROP): a group's members, a membership step, host a replica, drop one.
MEMBERS, CONF, HOST, DROP = "members", "conf", "host", "drop"
# A transaction's read (args [keys]): the leader answers at once unless it should wait, as
# the node's READ with its optimistic flag; commitflow.READ is the linearizable one.
OPTIMISTIC_READ = "optimistic read"


@dataclass(frozen=True)
class TxnSimParams:
    """The shape of one run."""

    nodes: int = 3
    shards: int = 3
    lists: int = 6  # keys the transactions read and append to
    clients: int = 4
    scanners: int = 1  # clients that take consistent scans of every list (api.scan's passes)
    snapshotters: int = 1  # clients that read some lists as one snapshot (api.get_many)
    backuppers: int = 1  # clients that back up every shard (api.backup of a cluster: exports)
    fault_time: float = 8.0  # virtual seconds of faults, then everything heals
    settle_time: float = 20.0  # then no new transactions: recovery settles what is prepared
    loss: float = 0.03  # probability that a message or request is lost
    delay: tuple[float, float] = (0.001, 0.012)  # one-way delay, uniform
    crash_every: float = 2.5  # mean virtual seconds between node crashes during faults
    partition_every: float = 2.0  # mean virtual seconds between partitions during faults
    vanish: float = 0.05  # probability that a client gives up between prepare and decide
    # Probability that a client's connections close after a round of prepares, while it
    # goes on (a dropped connection), and that they close when it vanishes (a dead process):
    # the nodes then settle its prepares at once (Node.orphaned), racing its own decision.
    orphan_notices: float = 0.0
    attempt_timeout: float = 0.3
    call_timeout: float = 3.0
    recovery_after: float = 1.0  # a transaction prepared this long is settled by its shard
    # Bytes per page of a scan pass: small, so that passes take several rounds of pages and
    # a locked one renews its lock (every recovery_after / 4) on the way.
    scan_page_bytes: int = 128
    renew_every: float | None = None  # seconds between renewals of a scan's lock; None: recovery_after / 4
    snapshot_every: int = 25  # applied entries between snapshots: exercises InstallSnapshot
    # Mean virtual seconds between compactions of a random replica at whatever index it has
    # applied (0: none), as a membership change (ADD_LEARNER) takes one: not only after
    # ``snapshot_every`` commands, but also right after entries with no command (a new
    # leader's first, a membership change), which a stored shard must make durable too.
    compact_every: float = 0.0
    # Mean virtual seconds between leadership transfers of a random group to another of its
    # voters (0: none), as an operator or the placement driver asks: the new leader starts
    # with an entry that carries no command, while commits and compactions go on.
    transfer_every: float = 0.0
    # Shard values on disk (pykv.replica.stored, in a temporary directory) rather than in
    # memory: a crash then loses the applied commands a replica had not yet written.
    stored: bool = False
    # Mean virtual seconds between checkpoints of a random stored replica's storage (0: none),
    # as a node's compaction thread writes them every few MiB: a restart then replays the
    # storage's WAL from that hint.
    checkpoint_every: float = 0.0
    # Probability that a crash of a node with stored shards is a power loss: each shard's
    # storage (fsync off: the Raft log is what makes commits durable) then keeps what it
    # fdatasync'd and an arbitrary prefix of what it wrote since, cut anywhere.
    power_loss: float = 0.0
    # Txids each shard remembers per table (None: the default). Small, retries reach txids
    # already forgotten, which must be refused rather than applied again.
    remembered: int | None = None
    # Replicas per shard (0: every node hosts every shard), and the mean virtual seconds
    # between replica moves during the faults (0: none). A move gives one replica of a shard
    # to a node outside it in the map; the groups get there one membership step at a time,
    # as the metadata leader takes them (Node._reconcile, shardmap.next_step): the new node
    # hosts an empty replica, joins as a learner and catches up from a snapshot, is
    # promoted, leadership leaves a node that goes, which is removed and drops its replica.
    replicas: int = 0
    moves_every: float = 0.0
    # Probability that the DROP telling a removed replica's node to delete it arrives 0.3 to
    # 2 s late; the next move then brings the replica back to that node, so the DROP often
    # finds it a member again (Node's DROP must then keep it).
    late_drops: float = 0.0
    raft: RaftConfig = field(default_factory=lambda: RaftConfig(election_ticks=10, heartbeat_ticks=2))


# The shapes seeds take in turn (txn_params_for): each stresses another part.
TXN_MIXES = {
    "base": TxnSimParams(),
    "five-nodes": TxnSimParams(nodes=5, shards=4, lists=8, clients=6, orphan_notices=0.15),
    # Recovery settles prepares while their clients are still committing them: the
    # coordinator shard's first recorded decision must win on every participant.
    "recovery-race": TxnSimParams(recovery_after=0.15, loss=0.08),
    "lossy": TxnSimParams(loss=0.2, attempt_timeout=0.15, orphan_notices=0.15),
    "snapshots": TxnSimParams(snapshot_every=5, crash_every=1.0),
    "stored": TxnSimParams(
        stored=True, snapshot_every=15, crash_every=1.5, power_loss=0.5, compact_every=0.1,
        transfer_every=0.5, checkpoint_every=0.1,
    ),
    # Shards remember only the last 2 txids: retries and recovery reach forgotten ones. A
    # participant whose FINISH died with its coordinator's node asks for the decision
    # only after 3 s, when the coordinator shard has decided many more since (six
    # clients and a crash every 0.6 s make that common: about one seed in eight).
    "forgetful": TxnSimParams(
        remembered=2, loss=0.1, recovery_after=3.0, crash_every=0.6, clients=6
    ),
    # Five nodes, three replicas per shard, and replicas moving while transactions prepare,
    # commit and settle: prepared and unfinished transactions and scan locks travel in the
    # snapshots, restored later in virtual time into stored shards, which a replica that
    # moves away again may leave while the restore still runs.
    "moves": TxnSimParams(
        nodes=5, replicas=3, moves_every=0.7, snapshot_every=10, stored=True, late_drops=0.3,
        power_loss=0.3, checkpoint_every=0.2,
    ),
}


def txn_params_for(seed: int) -> tuple[str, TxnSimParams]:
    name = list(TXN_MIXES)[seed % len(TXN_MIXES)]
    return name, TXN_MIXES[name]


@dataclass
class TxnSimResult:
    """A run's verdict (the fields ``pykv sim`` reports for either world)."""

    seed: int
    ok: bool
    faults: str = ""
    nodes: int = 0
    kind: str = ""
    detail: str = ""
    committed: int = 0
    aborted: int = 0
    unknown: int = 0
    virtual_seconds: float = 0.0
    events: Counter = field(default_factory=Counter)  # faults and recoveries that happened
    trace: list[str] = field(default_factory=list)

    @property
    def ops(self) -> int:
        """Transactions whose history was checked."""
        return self.committed + self.aborted + self.unknown


class SimDisk:
    """One node's durable Raft state (the NodeLog interface the host uses), in memory. It
    keeps what NodeLog would recover: a snapshot keeps the entries after its index, and new
    entries replace the stored log from their first index (pykv.sim.world.Disk models one
    group's torn writes instead, and drops every entry at a snapshot as Raft's log does).
    A hard state written without waiting (``persist(wait=False)``: only a commit index, as
    the node writes it) is lost in a power loss until a later fsync covers it."""

    def __init__(self) -> None:
        self.states: dict[int, PersistentState] = {}
        # Per group, the hard state last fsync'd, where a write without waiting (only a
        # commit index, as the node writes it) has changed it since: a power loss keeps that.
        self.unsynced: dict[int, HardState] = {}

    def persistent_state(self, group: int) -> PersistentState | None:
        return self.states.get(group)

    def persist(self, work: list[GroupWork], *, wait: bool = True) -> int:
        if wait:
            self.unsynced.clear()  # one fsync covers what was written before it
        for w in work:
            state = self.states.get(w.group, PersistentState())
            if not wait and w.group in self.states:
                self.unsynced.setdefault(w.group, state.hard_state)
            entries, snapshot = list(state.entries), state.snapshot
            if w.snapshot is not None:
                snapshot = w.snapshot
                cut_through(entries, w.snapshot.meta.index)
            if w.entries:
                cut_from(entries, w.entries[0].index)
                entries.extend(w.entries)
            hard = w.hard_state if w.hard_state is not None else state.hard_state
            self.states[w.group] = PersistentState(hard, tuple(entries), snapshot)
        return 0

    def lose_unsynced(self) -> int:
        """A power loss: each group's commit index goes back to its last fsync'd value.
        Returns how many groups lost one."""
        for group, hard in self.unsynced.items():
            state = self.states.get(group)
            if state is not None:
                self.states[group] = replace(state, hard_state=hard)
        lost, self.unsynced = len(self.unsynced), {}
        return lost

    def save_snapshot(self, group: int, snapshot: Snapshot) -> Any:
        state = self.states.get(group, PersistentState())
        entries = tuple(e for e in state.entries if e.index > snapshot.meta.index)
        self.states[group] = PersistentState(state.hard_state, entries, snapshot)
        return snapshot.data

    def snapshot_file(self, group: int, index: int) -> Any:
        snap = self.states[group].snapshot
        assert snap is not None and snap.meta.index == index
        return snap.data

    def compacted(self, group: int, index: int) -> None:
        """Entries up to index are behind the group's snapshot (save_snapshot dropped them)."""

    def truncate(self) -> int:
        return 0

    def pinning(self, max_segments: int) -> list[int]:
        """No segments here: the groups' logs are apart (a snapshot drops a group's own)."""
        return []

    def release(self, group: int) -> None:
        """Unlike a NodeLog's recovered copy, this is the disk itself: nothing to let go."""

    def drop(self, group: int) -> None:
        self.states.pop(group, None)

    def close(self) -> None:
        """Nothing to close."""


# --- tasks: generators that yield what they wait for ------------------------------------------

@dataclass
class Call:
    """Send one request to a node; the task resumes with its reply, or TIMEOUT."""

    node: int
    group: int
    kind: str  # "read", "optimistic read", "scan", a shard command tag or a placement request
    args: list


@dataclass
class Sleep:
    seconds: float


TIMEOUT = ("timeout", None)
VANISHED = object()  # what _drive returns when the client gave up on a flow half-way
# Rounds before which a client may vanish, and rounds worth counting: their events.
_VANISHING_BEFORE = {
    "decide": "clients vanished after prepare", "release": "readers vanished holding a lock",
}
_REQUESTS = (COMMIT, PREPARE, COMMIT_DECIDE)  # the commands whose first argument is a request
_NOTED_ROUNDS = {
    "give up": "decisions given up on a lock", "lock": "scans that locked the range",
    "lock keys": "snapshots that locked the keys", "lock all": "backups that locked every shard",
}
Task = Generator[Any, Any, Any]


class TxnWorld:
    """Nodes, a network, clients and the event queue of one seeded run."""

    def __init__(self, seed: int, params: TxnSimParams | None = None, root: Path | None = None) -> None:
        """``root``: where the shard stores live, for ``params.stored``."""
        self.seed = seed
        self.p = params or TxnSimParams()
        self.root = root
        self.rng = random.Random(seed)
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self.ids = list(range(1, self.p.nodes + 1))
        self.disks = {n: SimDisk() for n in self.ids}
        self.hosts: dict[int, ReplicaHost | None] = {}
        self.isolated: set[int] = set()
        self.leader_hint: dict[int, int] = {}
        self.history: list[Txn] = []
        self._waiting: dict[int, Task] = {}  # request id -> the task waiting for its reply
        self._next_request = 0
        self._settling: set[tuple[int, int]] = set()
        # Per node, the FINISH rounds of the commits it coordinates (Node.finishes).
        self.finishes: dict[int, FinishTracker] = {}
        # Per node, the prepares whose client connection closed (Node._orphans).
        self.orphans: dict[int, Orphans] = {}
        self.lives: Counter = Counter()  # per node, how many times it crashed
        # Where the map places each shard's replicas (the metadata group's map, which the
        # simulated metadata leader changes for moves: _mover).
        self.placement = {gid: self._founders(gid) for gid in range(self.p.shards)}
        self._started: set[int] = set()
        self._dropping: set[tuple[int, int]] = set()  # (node, shard): a stale replica's check
        self._coming_back: list[tuple[int, int]] = []  # (shard, node) whose DROP arrives late
        self._elements = 0
        self.faulty = True
        self.accepting = True
        self.events: Counter = Counter()
        for n in self.ids:
            self._start(n)

    # --- the event queue ------------------------------------------------------------------

    def at(self, delay: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._events, (self.now + delay, self._seq, fn))

    def run(self) -> TxnSimResult:
        p = self.p
        for n in self.ids:
            self.at(TICK * self.rng.random(), lambda n=n: self._tick(n))
        for c in range(p.clients):
            self.spawn(self._client(c))
        for c in range(p.scanners):
            self.spawn(self._reader(p.clients + c, self._scan))
        for c in range(p.snapshotters):
            self.spawn(self._reader(p.clients + p.scanners + c, self._snapshot))
        for c in range(p.backuppers):
            # Rarer: a backup locks every key while it begins (and a vanished one, until recovery).
            self.spawn(self._reader(p.clients + p.scanners + p.snapshotters + c, self._backup, (1.0, 3.0)))
        if p.moves_every:
            self.spawn(self._mover())
        self.at(self.rng.expovariate(1 / p.crash_every), self._crash_some)
        if p.compact_every:
            self.at(self.rng.expovariate(1 / p.compact_every), self._compact_some)
        if p.checkpoint_every:
            self.at(self.rng.expovariate(1 / p.checkpoint_every), self._checkpoint_some)
        if p.transfer_every:
            self.at(self.rng.expovariate(1 / p.transfer_every), self._transfer_some)
        self.at(self.rng.expovariate(1 / p.partition_every), self._partition_some)
        self.at(p.recovery_after / 4, self._recover)
        self.at(p.fault_time, self._heal)
        self.at(p.fault_time + 2.0, self._stop_clients)
        end = p.fault_time + p.settle_time
        while self._events and self._events[0][0] <= end:
            self.now, _, fn = heapq.heappop(self._events)
            fn()
        return self._check()

    # --- nodes ------------------------------------------------------------------------------

    def _start(self, node: int) -> None:
        if self.hosts.get(node) is not None:
            return  # already back (healing restarts every node that is down)
        host = ReplicaHost(
            node, self.disks[node],
            # As a node's: leaders keep half a snapshot interval behind it for followers.
            raft_config=replace(self.p.raft, catch_up_entries=self.p.snapshot_every // 2),
            rng=random.Random(self.rng.getrandbits(32)), clock=lambda: self.now,
            snapshot_every=self.p.snapshot_every, state_factory=self._state_factory(node),
        )
        if node in self._started:  # a restart: the groups its disk holds (Node.start)
            groups = {gid: None for gid in sorted(self.disks[node].states)}
        else:  # the first start: found the groups the map places here
            groups = {gid: voters for gid, voters in self.placement.items() if node in voters}
            self._started.add(node)
        for gid, voters in groups.items():
            host.add_group(gid, voters)
        host.restore_in_background = partial(self._restore_later, node, host)
        self.hosts[node] = host
        self.finishes[node] = FinishTracker()  # node-local: a crash forgets the rounds
        self.orphans[node] = Orphans()  # node-local too

    def _restore_later(
        self, node: int, host: ReplicaHost, gid: int, work: Callable[[], None],
        then: Callable[[BaseException | None], None],
    ) -> None:
        """As the node's restore thread: the image is restored a while later, unless the
        node crashes first. Meanwhile the state is out of bounds: the host must not touch
        it (any use raises, and stops the run)."""
        group = host.groups[gid]
        real, group.state = group.state, _Restoring(group.state)  # type: ignore[assignment]
        self.events["snapshots restored in the background"] += 1

        def restored() -> None:
            if self.hosts.get(node) is not host:
                return  # crashed: the restore died with the node
            group.state = real
            error = None
            try:
                work()
            except Exception as exc:  # noqa: BLE001 - handed to the host, as the node does
                error = exc
            then(error)
            self._cycle(node)

        self.at(self.rng.uniform(0.05, 0.5), restored)

    def _founders(self, gid: int) -> list[int]:
        """A shard's first replicas: ``replicas`` nodes in turn from its own (all by default)."""
        count = self.p.replicas or self.p.nodes
        return [self.ids[(gid + i) % self.p.nodes] for i in range(count)]

    def _state_factory(self, node: int) -> Callable[[int], ShardState]:
        remembered = self.p.remembered
        if not self.p.stored:
            return lambda gid: ShardState(gid, remembered=remembered)
        assert self.root is not None, "a stored run needs a root directory"
        # No background thread: the storage checkpoints when the seed says (_checkpoint_some).
        return lambda gid: StoredShardState(
            gid, self.root / f"n{node}" / f"g{gid}", cache_bytes=1 << 20, remembered=remembered,
            maintenance=False,
        )

    def _crash(self, node: int) -> None:
        """The node's memory is gone: Raft state, shard states, everything in flight. A stored
        shard keeps what it had written; the commands it applied but had not yet written
        are lost, and the Raft log on the disk replays them."""
        host = self.hosts[node]
        self.hosts[node] = None
        self.lives[node] += 1  # its own tasks (FINISH, recovery) die with it: node_task
        if host is not None and self.p.stored:
            power_lost = self.faulty and self.rng.random() < self.p.power_loss
            self.events["power losses"] += power_lost
            for group in [*host.groups.values(), *host.leaving.values()]:
                state = getattr(group.state, "real", group.state)  # restoring: _Restoring
                # No flush and no checkpoint: the unwritten rows die with the node, and the
                # storage's hint stays its last checkpoint's.
                synced_lsn = state.store.synced_lsn
                state.store.close(checkpoint=False)
                if power_lost:
                    self._cut_unsynced(state.path, synced_lsn)
            if power_lost:
                self.events["commit indexes lost to power losses"] += self.disks[node].lose_unsynced()

    def _cut_unsynced(self, path: Path, synced_lsn: int) -> None:
        """A power loss: the storage's WAL keeps its sealed segments (each fdatasync'd when
        the next was made), the records of the last up to ``synced_lsn``, and a prefix, cut
        at a random byte, of the rest of the last."""
        wal_dir = path / "wal"
        last = max(wal_dir.glob("*.wal"))
        synced = HEADER_SIZE
        for record in read_wal(str(wal_dir), repair=False, from_lsn=int(last.stem)):
            if record.lsn > synced_lsn:
                break
            synced = record.offset + len(record.payload)
        unsynced = last.stat().st_size - synced
        if unsynced <= 0:
            return
        keep = self.rng.randrange(unsynced)
        self.events["storage bytes lost to power losses"] += unsynced - keep
        with open(last, "r+b") as f:
            f.truncate(synced + keep)

    def close(self) -> None:
        for node in self.ids:
            self._crash(node)

    def _tick(self, node: int) -> None:
        host = self.hosts.get(node)
        if host is not None:
            host.tick()
            self._cycle(node)
        self.at(TICK, lambda: self._tick(node))

    def _cycle(self, node: int) -> None:
        """The node's driver: collect, send early, persist, send late, apply (node.py)."""
        host = self.hosts[node]
        while host is not None and self.hosts.get(node) is host:
            batch = host.collect()
            if not batch.readies and not batch.early:
                return
            self.events["snapshot installs"] += sum(rd.snapshot is not None for _, rd in batch.readies)
            self._send_raft(batch.early)
            # As the node: a batch that only moves commit indexes is not waited for.
            host.persist(batch, wait=batch.must_wait())
            self._send_raft(batch.late)
            host.apply(batch)

    def _send_raft(self, messages: list[Message]) -> None:
        for msg in messages:
            self._deliver(msg.frm, msg.to, lambda m=msg: self._step(m))

    def _step(self, msg: Message) -> None:
        host = self.hosts.get(msg.to)
        if host is not None:
            host.step(msg)
            self._cycle(msg.to)

    def _deliver(self, frm: int, to: int, fn: Callable[[], None]) -> None:
        """Schedule ``fn`` on arrival, unless the network loses it (node ids; clients < 0)."""
        if self.faulty and (self.rng.random() < self.p.loss or frm in self.isolated or to in self.isolated):
            return
        self.at(self.rng.uniform(*self.p.delay), fn)

    # --- faults -------------------------------------------------------------------------------

    def _crash_some(self) -> None:
        if not self.faulty:
            return
        self._crash_for_a_while(self.rng.choice(self.ids))
        self.at(self.rng.expovariate(1 / self.p.crash_every), self._crash_some)

    def _crash_for_a_while(self, victim: int) -> None:
        """Crash ``victim`` and restart it 0.3 to 2 s later, if no node is down: at most one
        is at a time, so a quorum stays."""
        if all(self.hosts.get(n) is not None for n in self.ids):
            self._crash(victim)
            self.events["crashes"] += 1
            self.at(self.rng.uniform(0.3, 2.0), lambda: self._start(victim))

    def _compact_some(self) -> None:
        if not self.faulty:
            return
        alive = [h for h in self.hosts.values() if h is not None]
        groups = [(h, g) for h in alive for g in h.groups.values() if g.restoring is None and not g.sending]
        if groups:
            host, group = self.rng.choice(groups)
            if host.snapshot_group(group):
                self.events["compactions at any index"] += 1
                if self.rng.random() < 0.2:  # and the node dies before writing anything more
                    self._crash_for_a_while(host.node_id)
        self.at(self.rng.expovariate(1 / self.p.compact_every), self._compact_some)

    def _checkpoint_some(self) -> None:
        if not self.faulty:
            return
        alive = [h for h in self.hosts.values() if h is not None]
        groups = [g for h in alive for g in h.groups.values() if g.restoring is None]
        if groups:
            self.rng.choice(groups).state.store.checkpoint()
            self.events["storage checkpoints"] += 1
        self.at(self.rng.expovariate(1 / self.p.checkpoint_every), self._checkpoint_some)

    def _transfer_some(self) -> None:
        if not self.faulty:
            return
        led = [
            (node, gid, group) for node, host in self.hosts.items() if host is not None
            for gid, group in host.groups.items() if group.raft.is_leader() and group.restoring is None
        ]
        if led:
            node, gid, group = self.rng.choice(led)
            others = sorted(n for n in group.raft.conf.voters if n != node)
            if others:
                target = self.rng.choice(others)
                host = self.hosts[node]
                assert host is not None
                host.change_membership(gid, Step(StepKind.TRANSFER_LEADER, target), lambda r, e: None)
                self.events["leadership transfers"] += 1
                self._cycle(node)
        self.at(self.rng.expovariate(1 / self.p.transfer_every), self._transfer_some)

    def _partition_some(self) -> None:
        if not self.faulty:
            return
        self.isolated = {self.rng.choice(self.ids)}
        self.events["partitions"] += 1
        self.at(self.rng.uniform(0.3, 1.5), self._unpartition)
        self.at(self.rng.expovariate(1 / self.p.partition_every), self._partition_some)

    def _unpartition(self) -> None:
        self.isolated = set()

    def _heal(self) -> None:
        self.faulty = False
        self.isolated = set()
        for n in self.ids:
            if self.hosts.get(n) is None:
                self._start(n)

    def _stop_clients(self) -> None:
        self.accepting = False

    # --- requests ---------------------------------------------------------------------------

    def spawn(self, task: Task, value: Any = None) -> None:
        try:
            instruction = task.send(value)
        except StopIteration:
            return
        if isinstance(instruction, Sleep):
            self.at(instruction.seconds, lambda: self.spawn(task))
            return
        self._next_request += 1
        rid = self._next_request
        self._waiting[rid] = task
        call: Call = instruction
        self._deliver(-1, call.node, lambda: self._serve(rid, call))
        self.at(self.p.attempt_timeout, lambda: self._reply(rid, TIMEOUT))

    def node_task(self, node: int, task: Task) -> Task:
        """``task`` run by ``node``: it ends when the node crashes, as a node's asyncio tasks
        do (a client's tasks outlive any node)."""
        life = self.lives[node]
        value = None
        with contextlib.closing(task):
            while self.lives[node] == life:
                try:
                    instruction = task.send(value)
                except StopIteration:
                    return
                value = yield instruction

    def _reply(self, rid: int, reply: Any) -> None:
        task = self._waiting.pop(rid, None)
        if task is not None:
            self.spawn(task, reply)

    def _answer(self, rid: int, node: int) -> Callable[[Any, BaseException | None], None]:
        def done(result: Any, error: BaseException | None) -> None:
            reply = ("ok", result) if error is None else _refusal(error)
            self._deliver(node, -1, lambda: self._reply(rid, reply))

        return done

    def _serve(self, rid: int, call: Call) -> None:
        """A node receives a request: a read or a proposal of a shard command."""
        host = self.hosts.get(call.node)
        if host is None:
            return
        done = self._answer(rid, call.node)
        try:
            if call.kind in (READ, OPTIMISTIC_READ):
                keys = tuple(call.args[0])

                def versions(state: ShardState) -> list:
                    return [state.get(k).to_wire() for k in keys]

                answered, result = (
                    host.read_now(call.group, versions, keys) if call.kind == OPTIMISTIC_READ else (False, None)
                )
                if answered:
                    done(result, None)
                else:  # a linearizable read, as the node's READ without its optimistic flag
                    host.read(call.group, versions, keys, done)
            elif call.kind == EXPORT:  # as the node's EXPORT
                export_id, step = call.args[:2]
                key_range = KeyRange(*call.args[2:5]) if step == "begin" else EVERY_KEY
                page = call.args[2] if step == "next" else 0
                host.export(call.group, export_id, step, self.p.scan_page_bytes, done, key_range, page)
            elif call.kind == SCAN:  # as the node's SCAN: after the locks in the range
                args, page_bytes = call.args, self.p.scan_page_bytes
                host.read(call.group, lambda state: scan_reply(state, args, page_bytes), KeyRange(*args[:3]), done)
            elif call.kind == MEMBERS:
                done(host.members(call.group), None)
            elif call.kind == CONF:
                host.change_membership(call.group, Step(StepKind(call.args[0]), call.args[1]), done)
            elif call.kind == HOST:  # idempotent, as the node's HOST
                if call.group not in host.groups:
                    host.add_group(call.group, None)
                done(None, None)
            elif call.kind == DROP:  # the node's DROP: gone once the group's leader confirms it
                if call.group in host.groups:
                    self._confirm_membership(call.node, call.group)
                done(None, None)
            else:
                args = call.args
                if call.kind == COMMIT_DECIDE:  # as Node.handle: it carries releases
                    args = self.finishes[call.node].commit_decide_args(call.group, *args)
                    done = self._then_finish(done, call.node, call.group, args[0]["txid"], args[1])
                writes = written_keys(args[0]) if call.kind in _REQUESTS else ()  # as the node
                host.propose(call.group, call.kind, args, done, writes)
        except Unavailable as exc:  # NotLeader too: the caller retries. Anything else is a
            done(None, exc)  # bug, and it stops the run loudly.
        self._cycle(call.node)

    def _then_finish(self, done: Callable, node: int, group: int, txid: int, others: list[int]) -> Callable:
        """COMMIT_DECIDE's leader passes the recorded decision on (Node._then_finish)."""

        def decided(outcome: Any, error: BaseException | None) -> None:
            done(outcome, error)
            commit = None if error is not None else recorded_decision(outcome)
            if commit is not None:
                self._finish_decided(node, commit, group, txid, list(others))

        return decided

    def _finish_decided(self, node: int, commit: bool, group: int, txid: int, others: list[int]) -> None:
        """FINISH on every other participant; a commit is released once all have applied it
        (Node._finish_decided, FinishTracker)."""
        finishes = self.finishes[node]
        if commit and not finishes.start(group, txid, others):
            return
        for shard in others:
            self.spawn(self.node_task(node, self._finish_one(finishes, commit, group, txid, shard)))

    def _finish_one(self, finishes: FinishTracker, commit: bool, group: int, txid: int, shard: int) -> Task:
        status, outcome = yield from self._call(shard, FINISH, [txid, commit])
        finishes.answered(group, txid, shard, status == "ok" and outcome is None)

    def _call(self, group: int, kind: str, args: list, timeout: float | None = None) -> Task:
        """One request to a shard's leader, retried as pykv.client.router does, until
        ``timeout`` (None: the call timeout): ``("ok", result)``, or ``("unknown", None)``
        when it gave up."""
        deadline = self.now + (self.p.call_timeout if timeout is None else timeout)
        attempt = 0
        while self.now < deadline:
            node = self.leader_hint.get(group) or self.ids[attempt % len(self.ids)]
            reply = yield Call(node, group, kind, args)
            status, value = reply
            if status == "ok":
                self.leader_hint[group] = node
                return reply
            attempt += 1
            if status == "redirect" and value is not None and value != node:
                self.leader_hint[group] = value
                continue
            self.leader_hint.pop(group, None)
            yield Sleep(0.01 * self.rng.uniform(0.5, 1.5))
        return ("unknown", None)

    # --- clients and recovery -------------------------------------------------------------------

    def shard_of(self, key: str) -> int:
        return int(key.removeprefix("list")) % self.p.shards

    def _client(self, client: int) -> Task:
        rng = random.Random(self.rng.getrandbits(32))
        n = 0
        while self.accepting:
            n += 1
            txid = (client + 1) << 32 | n
            yield from self._transaction(txid, rng)
            yield Sleep(rng.uniform(0.0, 0.05))

    def _reader(self, client: int, read: Callable[[int, random.Random], Task],
                pauses: tuple[float, float] = (0.05, 0.3)) -> Task:
        """A client that reads again and again (a scanner, a snapshotter, a backupper), a
        pause of ``pauses`` seconds between two: each read is recorded as a read-only
        transaction, which the history check then requires to be one snapshot, serialized
        inside its own lifetime."""
        rng = random.Random(self.rng.getrandbits(32))
        n = 0
        while self.accepting:
            n += 1
            yield from read((client + 1) << 32 | n, rng)
            yield Sleep(rng.uniform(*pauses))

    @property
    def _renew_every(self) -> float:
        """Seconds between renewals of a reader's lock while its locked pass runs."""
        return self.p.recovery_after / 4 if self.p.renew_every is None else self.p.renew_every

    def _scan(self, txid: int, rng: random.Random) -> Task:
        """A consistent scan of every list, as the client takes it (commitflow.scan_rounds):
        passes, and a lock on the range when they keep differing; here after 0, 1 or 3
        passes, so that both ways run often."""
        lock = CommitRequest(txid, 1, {}, (), timestamp=int(self.now * 1000), ranges=(KeyRange("list"),))
        passes = rng.choice((0, PASSES_BEFORE_LOCKING, PASSES_BEFORE_LOCKING))
        lists = [f"list{i}" for i in range(self.p.lists)]
        shards = list(range(self.p.shards))
        if rng.random() < 0.5:
            flow = scan_rounds(lock, shards, None, passes, self.p.scan_page_bytes, self._renew_every)
            reading = self._drive(flow, rng)
        else:  # as a caller iterates a scan past a tiny budget: the exports' pages read after
            reading = self._streamed(
                stream_scan_rounds(lock, shards, None, passes, self.p.scan_page_bytes, self._renew_every,
                                   max_bytes=rng.choice((1, self.p.scan_page_bytes))), rng)
        yield from self._read_and_record(txid, reading, lists, ("consistent scans", "scans failed"))

    def _streamed(self, flow: Generator[Round, Any, Scanned], rng: random.Random) -> Task:
        """A streamed scan's items (commitflow.stream_scan_rounds): what its flow held, then
        the rest of its exports, a page per shard at a time, as the client reads them on."""
        scanned = yield from self._drive(flow, rng)
        if scanned is VANISHED or scanned.rest is None:
            return scanned if scanned is VANISHED else scanned.items
        self.events["scans streamed"] += 1
        items = list(scanned.items)
        yield from self._drive(export_pages(scanned.rest, items.extend), rng)
        return items

    def _snapshot(self, txid: int, rng: random.Random) -> Task:
        """A snapshot of 2 or more lists, as the client takes it (commitflow.snapshot_rounds):
        passes, and a lock on the keys when they keep changing; here after 0, 1 or 3 passes,
        so that both ways run often."""
        keys = rng.sample([f"list{i}" for i in range(self.p.lists)], rng.randint(2, self.p.lists))
        lock = CommitRequest(txid, 1, {}, (), timestamp=int(self.now * 1000))
        passes = rng.choice((0, PASSES_BEFORE_LOCKING, PASSES_BEFORE_LOCKING))
        flow = snapshot_rounds(lock, read_batches(keys, self.shard_of), passes, self._renew_every)
        yield from self._read_and_record(txid, self._drive(flow, rng), sorted(keys), ("snapshots", "snapshots failed"))

    def _backup(self, txid: int, rng: random.Random) -> Task:
        """A backup of every shard, as the client takes it (pykv.client.cluster.copy_cluster:
        commitflow.export_rounds, then each shard's export read a page at a time from the
        node that holds it); recorded as a read of every list, which must be one snapshot."""
        lists = [f"list{i}" for i in range(self.p.lists)]
        yield from self._read_and_record(txid, self._backed_up(txid, rng), lists, ("backups", "backups failed"))

    def _backed_up(self, txid: int, rng: random.Random) -> Task:
        """A backup's items, begun again as the client begins it again (copy_cluster: up to
        BACKUP_ATTEMPTS, BACKUP_PAUSE apart) when an export was lost or a shard had no leader
        to begin one; each attempt under a lock of its own."""
        shards = list(range(self.p.shards))
        for attempt in range(BACKUP_ATTEMPTS):
            lock = CommitRequest(txid | attempt << 56, 1, {}, (), timestamp=int(self.now * 1000),
                                 ranges=(EVERY_KEY,))
            try:
                return (yield from self._exported(lock, shards, rng))
            except BACKUP_RETRIED:
                if attempt == BACKUP_ATTEMPTS - 1:
                    raise
                self.events["backups begun again"] += 1
                yield Sleep(BACKUP_PAUSE)
        raise AssertionError("unreachable")

    def _exported(self, lock: CommitRequest, shards: list[int], rng: random.Random) -> Task:
        """The items of every shard's export: begun as the client begins them
        (commitflow.export_rounds, under ``lock``), then their pages (commitflow.export_pages,
        unordered as a backup reads them)."""
        begun = yield from self._drive(export_rounds(lock, shards, self._renew_every), rng)
        if begun is VANISHED:
            return VANISHED
        export_id = lock.txid
        items: list = []
        paged = ExportPass(export_id, holders(shards, begun), EVERY_KEY, None, ordered=False)
        yield from self._drive(export_pages(paged, items.extend), rng)
        return items

    def _read_and_record(self, txid: int, reading: Task, keys: list[str], events: tuple[str, str]) -> Task:
        """Run a reader's task (a flow _driven: a scan's items, a snapshot's versions by key, a
        backup's) and record what it read of ``keys`` as a read-only transaction (events:
        what to count when it did, and when it failed)."""
        start = self.now
        try:
            found = yield from reading
        except Error:
            self.events[events[1]] += 1
            return
        if found is VANISHED:
            return  # nothing to record: what it locked stays locked until recovery releases it
        versions = dict(found)
        reads = []
        for key in keys:
            seen = versions.get(key)
            reads.append(("r", key, tuple(seen.value) if seen is not None and seen.exists else None))
        self.events[events[0]] += 1
        self.history.append(Txn(txid, tuple(reads), True, start, self.now))

    def _transaction(self, txid: int, rng: random.Random) -> Task:
        start = self.now
        keys = rng.sample([f"list{i}" for i in range(self.p.lists)], 2)
        ops: list = []
        reads: dict[str, Versioned] = {}
        for key in keys:
            status, value = yield from self._call(self.shard_of(key), OPTIMISTIC_READ, [[key]])
            if status != "ok":
                self._record(txid, ops, False, start)  # nothing was proposed: not applied
                return
            seen = Versioned.from_wire(value[0])
            reads[key] = seen
            ops.append(("r", key, tuple(seen.value) if seen.exists else None))
        writes = []
        for key in keys:
            self._elements += 1
            writes.append(WriteOp(key, OpKind.APPEND, self._elements, reads[key]))
            ops.append(("append", key, self._elements))
        request = CommitRequest(txid, 1, reads, tuple(writes), timestamp=int(self.now * 1000))
        committed = yield from self._commit(request, rng)
        self._record(txid, ops, committed, start)

    def _commit(self, request: CommitRequest, rng: random.Random) -> Generator[Any, Any, bool | None]:
        """True committed, False aborted, None unknown (the client's own rounds)."""
        try:
            outcome = yield from self._drive(commit_rounds(request, self.shard_of), rng)
        except Timeout:  # OutcomeUnknown too: the shard no longer knows (a forgotten txid)
            return None
        except Error:
            return False
        return None if outcome is VANISHED else True

    def _drive(self, flow: Generator[Round, Any, Any], rng: random.Random) -> Generator[Any, Any, Any]:
        """Run a flow of pykv.replica.commitflow as the client does, a round's requests sent
        one after another; returns what the flow returns, or VANISHED when the client gave
        up before a commit's decision or a scan's release (the shards settle it)."""
        results: list | None = None
        prepared: list[tuple[int, int]] = []  # (shard, txid) of the PREPAREs sent so far
        try:
            while True:
                try:
                    round_ = flow.send(results)
                except StopIteration as done:
                    return done.value
                if round_.name in _VANISHING_BEFORE and rng.random() < self.p.vanish:
                    self.events[_VANISHING_BEFORE[round_.name]] += 1
                    if self.p.orphan_notices and rng.random() < 0.5:
                        self._connections_closed(prepared, rng)  # not all deaths close them
                    return VANISHED
                prepared += [
                    (send.shard, send.args[0]["txid"]) for send in round_.sends if send.command == PREPARE
                ]
                if prepared and self.p.orphan_notices and rng.random() < self.p.orphan_notices:
                    self._connections_closed(prepared, rng)  # the client goes on regardless
                if round_.name in _NOTED_ROUNDS:
                    self.events[_NOTED_ROUNDS[round_.name]] += 1
                if not round_.wait:
                    for send in round_.sends:
                        self.spawn(self._call(send.shard, send.command, send.args) if send.node is None
                                   else self._call_node(send))
                    results = None
                    continue
                if round_.pause:
                    self.events["requests sent again after a lock"] += len(round_.sends)
                    yield Sleep(round_.pause)
                waiting = [True]  # while this round's results are awaited
                if round_.keep:
                    self.spawn(self._keep(round_, waiting))
                try:
                    results = []
                    for send in round_.sends:
                        if send.node is None:
                            status, value = yield from self._call(send.shard, send.command, send.args, round_.timeout)
                            results.append(_result(send.command, status, value))
                        else:  # to the node that holds an export, as the client asks it
                            reply = yield from self._call_node(send)
                            results.append(_export_reply(send.shard, send.node, *reply))
                finally:
                    waiting[0] = False
        finally:
            flow.close()

    def _call_node(self, send: Send) -> Task:
        """A request to the node ``send`` names (an export's holder), asked up to
        EXPORT_CALL_ATTEMPTS times as the client asks it: its last reply."""
        for _ in range(EXPORT_CALL_ATTEMPTS):
            reply = yield Call(send.node, send.shard, send.command, send.args)
            if reply[0] == "ok":
                break
        return reply

    def _keep(self, round_: Round, waiting: list[bool]) -> Task:
        """Send ``round_.keep`` again every ``round_.keep_every`` while the round waits (the
        client's AsyncCluster._keeping): a scan renewing its range lock."""
        while True:
            yield Sleep(round_.keep_every)
            if not waiting[0]:
                return
            self.events["range locks renewed during a locked pass"] += 1
            for send in round_.keep:
                yield from self._call(send.shard, send.command, send.args)

    def _record(self, txid: int, ops: list, committed: bool | None, start: float) -> None:
        end = self.now if committed is not None else None
        self.history.append(Txn(txid, tuple(ops), committed, start, end))

    def _connections_closed(self, prepared: list[tuple[int, int]], rng: random.Random) -> None:
        """A client's connections close: each node hears of it a little later (Node.orphaned).
        Every node, not only those its prepares went to: the nodes that do not lead those
        shards, or never saw them, must ignore it."""
        for node in self.ids:
            self.at(rng.uniform(0.0, 0.1), partial(self._orphaned, node, list(prepared)))

    def _orphaned(self, node: int, prepared: list[tuple[int, int]]) -> None:
        host = self.hosts.get(node)
        if host is None:
            return  # down: its connections closed with it
        self.events["prepares orphaned by a closed connection"] += len(prepared)
        self.orphans[node].mark(prepared, self.now)
        self._start_settling(node, orphans_to_settle(host.groups, prepared, self._settling))
        self._cycle(node)

    def _recover(self) -> None:
        """Every node sweeps as Node._sweep does, every recovery_after / 4 seconds."""
        for node, host in self.hosts.items():
            if host is not None:
                self._sweep(node)
        if self.p.moves_every:
            self._drop_stale_replicas()
        self.at(self.p.recovery_after / 4, self._recover)

    def _sweep(self, node: int) -> None:
        """pykv.replica.finishing.sweep, as Node._sweep: releases, FINISH again for commits
        left unfinished, settling of transactions prepared too long or orphaned."""
        host = self.hosts[node]
        assert host is not None
        after = self.p.recovery_after
        self.orphans[node].expire(self.now, after)
        work = sweep(host.groups, self.finishes[node], self.now, after, self._settling, orphans=self.orphans[node])
        for gid, txids in work.releases:
            with contextlib.suppress(Unavailable):  # the next leader sweeps them
                host.propose(gid, RELEASE, [txids], lambda result, error: None)
                self.events["releases proposed"] += 1
        for gid, txid, others in work.finish_again:
            self.events["unfinished commits swept"] += 1
            self._finish_decided(node, True, gid, txid, others)
        self._start_settling(node, work.settle)
        self._cycle(node)

    def _start_settling(self, node: int, settle: list[tuple[int, int, Prepared]]) -> None:
        for gid, txid, prepared in settle:
            self._settling.add((gid, txid))
            if (gid, txid) in self.orphans[node]:
                self.events["orphaned prepares settled"] += 1
            self.spawn(self.node_task(node, self._settle(
                gid, txid, prepared.coordinator_shard, prepared.request.timestamp
            )))

    # --- placement: replicas moving between nodes -----------------------------------------------

    def _mover(self) -> Task:
        """The metadata leader's placement work: during the faults, now and then one replica
        of a shard moves in the map; every group is taken there a step per round
        (Node._rebalance_round), until all are placed once the faults are over."""
        rng = random.Random(self.rng.getrandbits(32))
        next_move = rng.expovariate(1 / self.p.moves_every)
        while True:
            if self.faulty and self.now >= next_move:
                self._move_one(rng)
                next_move = self.now + rng.expovariate(1 / self.p.moves_every)
            placed = True
            for gid in range(self.p.shards):
                placed &= yield from self._reconcile(gid)
            if placed and not self.faulty:
                return
            yield Sleep(0.1)

    def _move_one(self, rng: random.Random) -> None:
        gid = rng.randrange(self.p.shards)
        back = None
        if self._coming_back:  # a replica whose DROP is late goes back to its node
            gid, back = self._coming_back.pop(0)
        current = self.placement[gid]
        outside = [n for n in self.ids if n not in current]
        if back in outside:
            outside = [back]
            self.events["replicas moved back while their DROP was late"] += 1
        if outside:
            leaving, coming = rng.choice(current), rng.choice(outside)
            self.placement[gid] = [coming if n == leaving else n for n in current]
            self.events["replica moves"] += 1

    def _reconcile(self, gid: int) -> Generator[Any, Any, bool]:
        """One membership step of a group towards its placement (Node._reconcile); True
        when it is there."""
        status, info = yield from self._call(gid, MEMBERS, [])
        if status != "ok":
            return False
        step = next_step(info["voters"], info["learners"], info["leader"], self.placement[gid])
        if step is None:
            return True
        if step.kind in (StepKind.ADD_LEARNER, StepKind.PROMOTE):
            status, _ = yield Call(step.node, gid, HOST, [])
            if status != "ok":
                return False
        status, _ = yield from self._call(gid, CONF, [step.kind.value, step.node])
        self.events[f"membership steps: {step.kind.value}"] += status == "ok"
        if status == "ok" and step.kind is StepKind.REMOVE:
            drop = Call(step.node, gid, DROP, [])  # once: a lost one leaves it to the node
            if self.faulty and self.rng.random() < self.p.late_drops:
                self.events["DROPs arriving late"] += 1
                self.spawn(self._later(self.rng.uniform(0.3, 2.0), drop))
                self._coming_back.append((gid, step.node))
            else:
                yield drop
        return False

    def _later(self, seconds: float, call: Call) -> Task:
        yield Sleep(seconds)
        yield call

    def _drop_stale_replicas(self) -> None:
        """A replica the map no longer places on its node asks its group's leader whether it
        still belongs, and goes when not (Node._drop_stale_replicas): one removed while its
        node was down, or whose DROP was lost."""
        for node, host in self.hosts.items():
            if host is None:
                continue
            for gid, group in host.groups.items():
                if node not in self.placement[gid] and not group.raft.is_leader():
                    self._confirm_membership(node, gid)

    def _confirm_membership(self, node: int, gid: int) -> None:
        """Ask the group's leader whether ``node`` still belongs; drop its replica if not."""
        if (node, gid) not in self._dropping:
            self._dropping.add((node, gid))
            self.spawn(self.node_task(node, self._drop_if_removed(node, gid)))

    def _drop_if_removed(self, node: int, gid: int) -> Task:
        try:
            status, info = yield from self._call(gid, MEMBERS, [])
            host = self.hosts.get(node)
            if status == "ok" and node not in info["voters"] + info["learners"] and host is not None:
                if gid in host.groups:
                    host.remove_group(gid)
                    self.events["stale replicas dropped"] += 1
        finally:
            self._dropping.discard((node, gid))

    def _settle(self, gid: int, txid: int, coordinator_shard: int, timestamp: int) -> Task:
        try:
            status, decision = yield from self._call(coordinator_shard, DECIDE, [txid, False, timestamp])
            if status == "ok":
                status, _ = yield from self._call(gid, FINISH, [txid, bool(decision)])
                self.events["prepares settled by recovery"] += status == "ok"
        finally:
            self._settling.discard((gid, txid))

    # --- the checks -----------------------------------------------------------------------------

    def _check(self) -> TxnSimResult:
        result = TxnSimResult(self.seed, True, nodes=self.p.nodes, events=self.events,
                              virtual_seconds=self.now)
        result.committed = sum(1 for t in self.history if t.committed)
        result.aborted = sum(1 for t in self.history if t.committed is False)
        result.unknown = sum(1 for t in self.history if t.committed is None)
        for gid in range(self.p.shards):
            hosting = {n: h.groups[gid] for n, h in self.hosts.items() if h is not None and gid in h.groups}
            placed = set(self.placement[gid])
            confs = {(frozenset(g.raft.conf.voters), frozenset(g.raft.conf.learners)) for g in hosting.values()}
            if set(hosting) != placed or confs != {(frozenset(placed), frozenset())}:
                return _violation(result, "replicas not placed", f"shard {gid} is on nodes "
                                  f"{sorted(hosting)} (members {confs}), placed on {sorted(placed)}")
            replicas = [g.state for g in hosting.values()]
            prepared = {t for s in replicas for t in s.prepared}
            if prepared:
                return _violation(result, "stuck prepare", f"shard {gid} still holds {sorted(prepared)}")
            unfinished = {t for s in replicas for t in s.unfinished}
            if unfinished:
                return _violation(result, "commit never released", f"shard {gid} keeps {sorted(unfinished)}")
            versions = [s.scan("", None, None, None, True) for s in replicas]
            if any(v != versions[0] for v in versions):
                return _violation(result, "replicas differ", f"shard {gid}")
        # Close every list's history with a read of its final value.
        reads = []
        for i in range(self.p.lists):
            key = f"list{i}"
            gid = self.shard_of(key)
            final = self.hosts[self.placement[gid][0]]
            assert final is not None
            seen = final.groups[gid].state.get(key)
            reads.append(("r", key, tuple(seen.value) if seen.exists else None))
        self.history.append(Txn(0, tuple(reads), True, self.now, self.now))
        checked = check_serializable(self.history, strict=True)
        if not checked.ok:
            return _violation(result, "not serializable", checked.explanation)
        return result


class _Restoring:
    """Stands for a state being restored off the host's thread: touching it is a bug."""

    def __init__(self, real: ShardState) -> None:
        self.real = real

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the host used {name!r} of shard {self.real.shard} while it was restoring")


def _refusal(error: BaseException) -> tuple[str, Any]:
    if isinstance(error, NotLeader):
        return ("redirect", error.leader_hint)
    return ("unavailable", str(error))


def _export_reply(shard: int, node: int, status: str, value: Any) -> Any:
    """A reply of the node that holds an export, as the client takes it: [node, page,
    more?], or TransactionConflict when it did not answer or the export is gone (the reader
    reads again)."""
    if status != "ok":
        return TransactionConflict(f"export of shard {shard} on node {node}: {status} {value}")
    return value


def _result(command: str, status: str, value: Any) -> Any:
    """A reply as the commit flow takes it (as pykv.client's router hands it over): a
    prepare's vote as it is, another command's refusal as the error it names, giving up as
    Timeout."""
    if status != "ok":
        return Timeout("gave up")
    if command in (PREPARE, SCAN, READ, EXPORT) or not isinstance(value, list):
        return value  # a vote, a scan's items, versions read, an export, None or a decision
    return by_name(value[0], value[1])


def _violation(result: TxnSimResult, kind: str, detail: str) -> TxnSimResult:
    result.ok, result.kind, result.detail = False, kind, detail
    return result


def run_txn_seed(seed: int, params: TxnSimParams | None = None) -> TxnSimResult:
    """Run one seed and check it (``params`` None: the seed's mix, txn_params_for)."""
    name = "custom"
    if params is None:
        name, params = txn_params_for(seed)
    root = Path(tempfile.mkdtemp(prefix="pykv-txnsim-")) if params.stored else None
    world = TxnWorld(seed, params, root)
    try:
        result = world.run()
    finally:
        world.close()
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
    result.faults = name
    return result
