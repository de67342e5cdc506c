"""One cluster node: an asyncio (uvloop) server hosting a replica of many shards.

The node is the composition root of the cluster: it opens the node's WAL (pykv.replica.
durable), hosts one Raft group per shard it replicates (pykv.replica.host), listens for
clients and peers on one port, and runs the driver loop:

    tick every ``tick_ms``  ->  collect one Ready from every group with work
    ->  send leader appends early (safe, see pykv.replica.host)
    ->  persist the whole batch: ONE WAL record, ONE fdatasync, on a worker thread
    ->  send every other message, batched into one RAFT frame per peer
    ->  apply committed entries, answer proposals and reads, advance.

While a batch is being persisted the loop keeps receiving messages and requests, which
go into the next batch: that is the group commit of the cluster.

Every request, a client's or a peer's, is served by ``Node.handle(kind, body, respond)``,
which gives ``respond`` the reply exactly once: at once, or from the ReplicaHost completion
callback of its proposal or read (no asyncio future per request). The node's own tasks that
await a reply (recovery, removing a dead member) send it requests the same way (``_ask``).

Multi-shard transactions are coordinated by the client (pykv.client) over the shards'
Raft groups. The node that leads a coordinator shard tells the other participants the
decision (FINISH) and releases a commit once they all applied it (pykv.replica.finishing);
and a recovery task settles a prepared transaction left undecided for ``recovery_after``
seconds by asking its coordinator shard to record a decision (the first recorded decision
wins, normally the client's), then finishing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import random
import signal
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from pykv.api import HybridClock
from pykv.client.router import Router, ShardMapView
from pykv.client.transport import (
    COMMIT,
    COMMIT_DECIDE,
    CONF,
    DECIDE,
    DROP,
    EXPORT,
    FAILED,
    FINISH,
    HOST,
    JOIN,
    LEAVE,
    LOAD,
    MEMBERS,
    META_GROUP,
    OK,
    PING,
    PREPARE,
    RAFT,
    READ,
    REDIRECT,
    RESOLVER,
    RESOLVERS,
    SCAN,
    SHARD_MAP,
    SNAPSHOT_CHUNK,
    STATUS,
    WIPE,
)
from pykv.cluster.liveness import Removal, decide_removal
from pykv.cluster.shardmap import ShardMap, Step, StepKind, next_step
from pykv.errors import CorruptData, Error, InvalidArgument, ProtocolError, Timeout, Unavailable
from pykv.net.framing import CLUSTER_MAX_FRAME, RESPONSE, encode_frame
from pykv.net.protocol import Connection, ServerProtocol, parse_address
from pykv.raft.errors import NotLeader
from pykv.raft.messages import Message, Role
from pykv.raft.node import RaftConfig
from pykv.replica.durable import NodeLog
from pykv.replica.finishing import FinishTracker, Orphans, orphans_to_settle, sweep
from pykv.replica.host import Batch, Done, ReplicaHost, snapshot_every_for
from pykv.replica.meta import SET_MAP, MetaState, meta_replicas
from pykv.replica.shard import COMMIT as CMD_COMMIT
from pykv.replica.shard import COMMIT_DECIDE as CMD_COMMIT_DECIDE
from pykv.replica.shard import DECIDE as CMD_DECIDE
from pykv.replica.shard import FINISH as CMD_FINISH
from pykv.replica.shard import LOAD as CMD_LOAD
from pykv.replica.shard import PREPARE as CMD_PREPARE
from pykv.replica.shard import RELEASE as CMD_RELEASE
from pykv.replica.shard import RESOLVER as CMD_RESOLVER
from pykv.replica.shard import WIPE as CMD_WIPE
from pykv.replica.shard import (
    Prepared,
    ShardState,
    recorded_decision,
    remembered_per_shard,
    scan_reply,
    written_keys,
)
from pykv.replica.stored import StoredShardState, segment_bytes_for
from pykv.server.identity import claim_identity
from pykv.server.loopstats import GcPauses, StepTimes, resident_bytes
from pykv.server.snapshots import CHUNK_BYTES, SnapshotReceiver, SnapshotSender, is_install
from pykv.storage.cache import SharedCache
from pykv.storage.files import DirectoryLock, make_dirs_durably
from pykv.storage.maintenance import Maintainer
from pykv.txn.model import EVERY_KEY, SCAN_PAGE_BYTES, CommitRequest, KeyRange, KeyUpdate
from pykv.txn.occ import check_fits
from pykv.types import check_key

log = logging.getLogger("pykv.node")
# The loop's clock and timers run in whole milliseconds (libuv): a timer may fire up to 1 ms
# before a deadline set in finer time. A tick that was due within this much is taken then;
# otherwise the driver would set the timer again with a delay under 1 ms, which fires at
# once, and spin on the loop until the clock reached the deadline.
_TIMER_SLACK = 0.001
# The latest PREPAREs a connection remembers for Node.orphaned: far more than a client has
# under way (a few per transaction in flight), so none of those is forgotten.
WATCHED_PREPARES = 4096
# Once every group is where the shard map places it, the metadata leader re-checks them all
# only this often (each check asks every group's leader for its members).
RECHECK_PLACED_S = 10.0
# How far ahead of this node's clock a request's timestamp (its client's hybrid clock) may be.
# A shard refuses a txid it no longer remembers when its timestamp is at or below the newest
# forgotten one (Remembered.watermark, which keeps retries from applying twice): a client
# whose clock ran an hour ahead would, once its transactions were forgotten, have every other
# client's commits refused for that hour. Far above clock error under NTP (milliseconds), far
# below the minutes a shard takes to forget (remembered_per_shard). DECIDE's timestamp is
# checked too (the decisions' watermark): between two nodes whose clocks differ by more, a
# prepared transaction's recovery may wait until the stamp is no longer that far ahead.
MAX_CLOCK_AHEAD_S = 10.0


@dataclass
class NodeConfig:
    """Everything a node needs to start; built from `pykv serve` arguments."""

    node_id: int
    listen: str
    peers: dict[int, str]  # every node of the cluster, this one included: id -> address
    data_dir: Path
    initial: list[int] = field(default_factory=list)  # the founding members of the ring
    partitions: int = 16
    replicas: int = 3
    vnodes: int = 64
    tick_ms: float = 10.0
    election_ticks: int = 40
    heartbeat_ticks: int = 10
    # A group idle this long quiesces: no ticks, no heartbeats (pykv.raft.node); 0 = never.
    quiesce_ticks: int = 100
    fsync: str = "always"
    # Seconds a prepared transaction waits before recovery settles it; a consistent scan
    # renews its range lock more often than that (commitflow.LOCK_RENEW_EVERY).
    recovery_after: float = 2.0
    scan_page_bytes: int = SCAN_PAGE_BYTES  # about what one SCAN reply carries at most
    max_frame: int = CLUSTER_MAX_FRAME  # big transactions fit; snapshots go in chunks
    # Applied entries between two snapshots of a group (its Raft log lives in memory until
    # then); None: a share of one node-wide budget (pykv.replica.host.snapshot_every_for).
    snapshot_every: int | None = None
    # Persist on the loop thread (the WAL releases the GIL while it fsyncs) rather than
    # hopping to a worker thread: fewer wake-ups per batch, bigger batches.
    persist_inline: bool = True
    # Seconds the driver yields between two batches: lets replies out and requests in, so
    # the next batch carries more (0 = just yield once).
    batch_wait: float = 0.0
    # "storage": shard values on disk (pykv.storage, via pykv.replica.stored);
    # "memory": shard values in memory, with snapshots on disk.
    state: str = "storage"
    # The read cache of shard values (state="storage"), shared by all the shards of the node.
    cache_bytes: int = 64 << 20
    # How a shard leader confirms a read: "safe" = ReadIndex, one heartbeat round per batch
    # of reads (no clock assumption); "lease" = no round while a quorum acknowledged a
    # heartbeat recently, which is linearizable only while clock drift stays bounded.
    reads: str = "safe"
    # Seconds a member may stay unreachable before the metadata leader takes it out of the
    # shard map (as `pykv cluster remove` would) so its shards move to live nodes; 0 = never.
    dead_after: float = 300.0
    # The cluster exists already (`cluster up` restarting it; `pykv serve --existing`): with
    # an empty data directory this node LOST its data, so it must not found its groups again
    # (with a Raft term and vote forgotten it could vote twice in a term). It rejoins instead:
    # see Node._rejoin_after_data_loss.
    existing: bool = False
    # The cluster this node belongs to (`pykv serve --cluster-id`); None: the one its data
    # directory records, or for a new directory one derived from the founders (identity.py).
    cluster_id: str | None = None


class _Peer:
    """The outgoing Raft link to one peer: connects lazily, reconnects with backoff, never
    blocks. It rides on the node's router connection to that peer, so Raft batches and the
    node's own requests (FINISH, recovery) share one connection and leave in the same write."""

    def __init__(self, node: Node, peer_id: int, address: str) -> None:
        self.node = node
        self.peer_id = peer_id
        self.address = address
        self.conn: Connection | None = None
        self._connecting = False
        self._next_try = 0.0

    def send(self, wires: list, *, now: bool = False) -> None:
        conn = self.conn
        if conn is not None and not conn.closed:
            self._send_within_frames(conn, wires)
            if now:
                conn.flush()
            return
        loop = asyncio.get_running_loop()
        if not self._connecting and loop.time() >= self._next_try:
            self._connecting = True
            loop.create_task(self._connect())
        # Messages to an unreachable peer are dropped; Raft retransmits what matters.

    def _send_within_frames(self, conn: Connection, wires: list) -> None:
        """One RAFT frame for the batch, or halves of it while it is larger than max_frame
        (many groups' appends at once)."""
        try:
            conn.send(RAFT, [self.node.config.node_id, wires])
        except ProtocolError as exc:
            if len(wires) > 1:
                half = len(wires) // 2
                self._send_within_frames(conn, wires[:half])
                self._send_within_frames(conn, wires[half:])
                return
            # One message over max_frame: dropped, and the log says why this peer lags.
            log.error("cannot send a Raft message to node %d: %s", self.peer_id, exc)

    async def _connect(self) -> None:
        try:
            self.conn = await self.node.router.connection(self.address)
        except (Error, OSError):  # unreachable, or refused the handshake (logged by pykv.net)
            self._next_try = asyncio.get_running_loop().time() + 0.2
        finally:
            self._connecting = False

    async def connection(self) -> Connection | None:
        """The open connection to this peer, connecting now if need be; None if unreachable."""
        if self.conn is None or self.conn.closed:
            await self._connect()
        conn = self.conn
        return conn if conn is not None and not conn.closed else None


class _ServerProtocol(ServerProtocol):
    """A client's or a peer's connection to this node: Raft batches to on_raft, requests to handle."""

    def __init__(self, node: Node) -> None:
        super().__init__(node.config.max_frame, node.cluster_id)
        self.node = node
        # (shard, txid) of the latest PREPAREs that came this way (a scan's lock too): when
        # the connection closes, their client may have died mid-commit (Node.orphaned).
        self.prepares: dict[tuple[int, int], None] = {}

    def request_received(self, kind: int, request_id: int, body: Any) -> None:
        if kind == RAFT or kind == SNAPSHOT_CHUNK:
            if self.peer_cluster is None:
                # Only a node says its cluster in its HELLO before it has met any other.
                raise ProtocolError("Raft messages from a peer that named no cluster in its "
                                    "HELLO (a client, or a node of an older release)")
            if kind == RAFT:
                self.node.on_raft(body)
            else:
                self.node.on_snapshot_chunk(body)
            return
        self.node.counters["requests"] += 1
        if kind == PREPARE:
            self._note_prepare(body)
        self.node.handle(kind, body, lambda reply: self.respond(request_id, reply))

    def _note_prepare(self, body: Any) -> None:
        with contextlib.suppress(TypeError, ValueError, KeyError, IndexError):  # handle() refuses it
            prepares = self.prepares
            prepares[(int(body[0]), int(body[1]["txid"]))] = None
            if len(prepares) > WATCHED_PREPARES:
                del prepares[next(iter(prepares))]

    def lost(self, exc: Exception | None) -> None:
        super().lost(exc)
        if self.prepares:
            self.node.orphaned(list(self.prepares))

    def refusal(self, request_id: int, exc: ProtocolError) -> bytes:
        return encode_frame(RESPONSE, [FAILED, "ProtocolError", str(exc)], request_id=request_id)


def _loadable(update: KeyUpdate) -> KeyUpdate:
    """A LOAD's key update, once its key and value are within the limits a commit's are
    (KeyTooLarge, InvalidKey, ValueTooLarge); ProtocolError was raised for a malformed one."""
    check_key(update.key)
    check_fits(update.value)
    return update


def _answer(convert: Callable[[Any], Any], respond: Callable[[Any], None]) -> Done:
    """A ReplicaHost completion callback that sends the converted reply (or the error's)."""

    def done(result: Any, error: BaseException | None) -> None:
        if error is not None:
            respond(_error_reply(error))
            return
        try:
            reply = convert(result)
        except Exception as exc:  # noqa: BLE001 - reported to the requester
            reply = _error_reply(exc)
        respond(reply)

    return done


def _exit_for_restart(what: str) -> None:
    """Crash-only: exit the process (logging the exception being handled) rather than go on
    in a state that may be half changed; a restart recovers from the WAL."""
    log.exception("%s; exiting so the node restarts from its WAL", what)
    logging.shutdown()
    os._exit(70)


def _exit_misconfigured(message: str) -> None:
    """Stop a node that must not go on as configured (one log line, exit status 2)."""
    log.error(message)
    logging.shutdown()
    os._exit(2)


def _nobody_waits(result: Any, error: BaseException | None) -> None:
    """The completion callback of a proposal whose outcome nobody waits for."""


def _error_reply(exc: BaseException) -> list:
    if isinstance(exc, NotLeader):
        return [REDIRECT, exc.leader_hint]
    if isinstance(exc, Error):
        return [FAILED, type(exc).__name__, str(exc)]
    log.exception("unexpected error while serving a request", exc_info=exc)
    return [FAILED, "Error", f"{type(exc).__name__}: {exc}"]


def _outcome_reply(outcome: Any) -> list:
    """A shard outcome (None or [error name, message]) as a reply."""
    if outcome is None:
        return [OK, None]
    return [FAILED, outcome[0], outcome[1]]


class Node:
    """A running node (create, then ``await start()``; ``await stop()`` to shut down)."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        founders = config.initial or sorted(config.peers)
        # The founding map: every founding member computes exactly this one from its
        # configuration; later versions come from the metadata group's log.
        self.founding_map = ShardMap(
            version=1,
            nodes=tuple(founders),
            addresses={n: config.peers[n] for n in founders if n in config.peers},
            partitions=config.partitions,
            vnodes=config.vnodes,
            replicas=config.replicas,
        )
        # The metadata group's founding voters: placed like its later members (meta_replicas),
        # so a cluster founded with more than ``replicas`` nodes does not shrink it at once.
        self.meta_founders = meta_replicas(self.founding_map)
        # For nodes outside the metadata group: the newest map and the metadata group's
        # voters as another node reported them (see _refresh_learned_map).
        self._learned_map: ShardMap | None = None
        self._learned_meta: list[int] = list(self.meta_founders)
        self.pending_moves = 0
        self._balanced_version = 0
        self._placement_term = 0  # the metadata term of the last placement check (a new leader checks)
        self._next_placement_check = 0.0
        self._may_join = False
        self._lost_data = False  # fresh under `existing`: leave my groups, to be added back
        # Monotonic counters for `pykv status --json` and benchmarks.
        self.counters: dict[str, int] = defaultdict(int)
        self.step_times = StepTimes()  # how long the driver holds the loop at a time
        self.gc_pauses = GcPauses()  # installed while the node runs (start/stop)
        self.host: ReplicaHost | None = None
        self.nodelog: NodeLog | None = None
        self.peers: dict[int, _Peer] = {}
        self._server: asyncio.AbstractServer | None = None
        self._tasks: list[asyncio.Task] = []
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pykv-persist")
        # Snapshot images are restored here, off the loop (seconds per GB): the node's other
        # groups go on ticking, answering and leading meanwhile.
        self._restorer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pykv-restore")
        self._wake: asyncio.Future | None = None
        self._stopping = False
        self._resolving: set[tuple[int, int]] = set()
        self._orphans = Orphans()  # prepares whose client connection closed (orphaned)
        self._background: set[asyncio.Task] = set()  # FINISH calls elsewhere, DROP checks
        self.finishes = FinishTracker()  # commits this node coordinates, until released
        # InvalidArgument for a file where the directory goes, as pykv.open says.
        make_dirs_durably(str(config.data_dir))
        # One process per data directory: a second one would replay, and write to, the WAL
        # the first one is appending to (StoreLocked, naming the pid that holds it).
        self._dir_lock = DirectoryLock(str(config.data_dir))
        try:
            self.cluster_id = claim_identity(
                config.data_dir, config.node_id, config.cluster_id, self.founding_map.addresses,
                config.partitions,
            )
        except BaseException:
            self._dir_lock.release()
            raise
        self.router = Router(list(config.peers.values()), timeout=5.0, max_frame=config.max_frame,
                             cluster=self.cluster_id)
        self._maintainer: Maintainer | None = None  # the shard stores' compaction thread
        self._cache: SharedCache | None = None  # the shard stores' read cache, shared
        self.snapshots_out = SnapshotSender(
            config.node_id, self._peer_connection, self._snapshot_failed, self._snapshot_sending,
            chunk_bytes=min(CHUNK_BYTES, config.max_frame // 2),
            directory=config.data_dir / "outgoing",
        )
        self.snapshots_in = SnapshotReceiver(self._step_one, config.data_dir / "incoming")
        self.stopped = asyncio.Event()

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        self.gc_pauses.install()
        self.nodelog = NodeLog(cfg.data_dir, fsync=cfg.fsync)
        snapshot_every = cfg.snapshot_every or snapshot_every_for(cfg.partitions)
        raft_config = RaftConfig(
            election_ticks=cfg.election_ticks,
            heartbeat_ticks=cfg.heartbeat_ticks,
            quiesce_ticks=cfg.quiesce_ticks,
            max_inflight=256,
            # A peer's batch of messages travels in frames; one message must fit in one.
            max_batch_bytes=min(1 << 20, cfg.max_frame // 4),
            read_only=cfg.reads,
            # A follower down a short while catches up from the log, not a whole snapshot.
            catch_up_entries=snapshot_every // 2,
        )
        self.host = ReplicaHost(
            cfg.node_id,
            self.nodelog,
            raft_config=raft_config,
            rng=random.Random(int.from_bytes(os.urandom(8), "big")),
            clock=time.monotonic,
            snapshot_every=snapshot_every,
            state_factory=self._state_factory(),
        )
        self.host.on_role_change = self._role_changed
        self.host.on_lost_ack = self._lost_ack
        self.host.restore_in_background = self._restore_in_background
        recovered = set(self.nodelog.groups())
        fresh = not recovered and not self.nodelog.dropped
        self._lost_data = fresh and cfg.existing
        if self._lost_data:
            log.warning("event=lost_data node=%d: the data directory is empty but the cluster "
                        "exists; founding nothing, rejoining as a new replica of each group",
                        cfg.node_id)
            fresh = False  # found nothing; a node the map does not name yet joins (below)
        if META_GROUP in recovered:
            # A member of the metadata group, founding or added later: restart it from the
            # WAL and snapshots (its members are whatever its Raft configuration says now).
            self.host.add_group(META_GROUP, None, MetaState)
        elif fresh and cfg.node_id in self.meta_founders:
            self.host.add_group(META_GROUP, self.meta_founders, MetaState)  # found it (first start)
        for gid in sorted(recovered - {META_GROUP}):
            self.host.add_group(gid, None)  # restart from the WAL and snapshots
        # Only a node starting empty asks to join; one that was removed stays out.
        self._may_join = fresh or self._lost_data
        for shard in range(cfg.partitions):
            replicas = list(self.founding_map.replicas_of(shard))
            if fresh and cfg.node_id in replicas:
                self.host.add_group(shard, replicas)  # found the group (first start only)
        host, port = parse_address(cfg.listen)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _ServerProtocol(self), host, port, reuse_address=True)
        self._tasks.append(loop.create_task(self._drive_or_die()))
        self._tasks.append(loop.create_task(self._recover_prepared()))
        self._tasks.append(loop.create_task(self._membership()))
        self._tasks.append(loop.create_task(self._replace_dead_members()))
        log.info("node %d listening on %s with %d groups", cfg.node_id, cfg.listen, len(self.host.groups))

    def _state_factory(self) -> Any:
        # The remembered txids are shared out of one node-wide budget, whatever the partitions.
        remembered = remembered_per_shard(self.config.partitions)
        segment_bytes = segment_bytes_for(self.config.partitions)
        if self.config.state == "memory":
            return lambda gid: ShardState(gid, remembered=remembered)
        shards_dir = self.config.data_dir / "shards"
        # One cache budget and one compaction thread for every shard here, however many.
        cache = self._cache = SharedCache(self.config.cache_bytes)
        maintainer = self._maintainer = Maintainer(name=f"pykv-maintenance-{self.config.node_id}")

        def make(gid: int) -> ShardState:
            return StoredShardState(gid, shards_dir / f"g{gid}", cache=cache,
                                    maintainer=maintainer, remembered=remembered,
                                    segment_bytes=segment_bytes)

        return make

    async def stop(self) -> None:
        self._stopping = True
        self.gc_pauses.uninstall()
        self._wakeup()
        if self._server is not None:
            self._server.close()
        self.snapshots_out.close()
        self.snapshots_in.close()
        for task in [*self._tasks, *self._background]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._background, return_exceptions=True)
        await self.router.close()
        for peer in self.peers.values():
            if peer.conn is not None:
                peer.conn.close()
        self._io.shutdown(wait=True)
        # A restore under way writes into its shard's storage until it ends.
        await asyncio.get_running_loop().run_in_executor(None, self._restorer.shutdown)
        if self.host is not None:
            self.host.close()
        if self._maintainer is not None:
            self._maintainer.close()
        if self.nodelog is not None:
            self.nodelog.close()
        self._dir_lock.release()
        self.stopped.set()

    # --- the driver loop --------------------------------------------------------------------

    def _wakeup(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def _drive_or_die(self) -> None:
        """Crash-only: a driver that fails exits the process (restart recovers from the WAL)
        rather than leaving a node that answers connections but never makes progress."""
        try:
            await self._drive()
        except asyncio.CancelledError:
            raise
        except BaseException:
            _exit_for_restart("the driver loop failed")

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        host = self.host
        assert host is not None
        tick = self.config.tick_ms / 1000.0
        next_tick = loop.time() + tick
        while not self._stopping:
            now = loop.time()
            started, gc_before = time.perf_counter(), self.gc_pauses.total_s
            if now + _TIMER_SLACK >= next_tick:
                host.tick()
                next_tick = max(next_tick + tick, now + tick / 2)
            batch = host.collect(load_snapshots=False)  # images stream in chunks (_send)
            if batch.readies or batch.early:  # early: maybe only keepalives
                self.counters["batches"] += 1
                self.counters["entries_applied"] += sum(
                    len(rd.committed_entries) for _, rd in batch.readies
                )
                wait = batch.must_wait()
                # An inline persist blocks the loop in the fsync: the leaders' appends must
                # leave before it, so that followers write in parallel with this node.
                self._send(batch.early, now=wait and self.config.persist_inline)
                if wait:
                    if self.config.persist_inline:
                        host.persist(batch)
                    else:
                        self.step_times.record(time.perf_counter() - started)
                        await loop.run_in_executor(self._io, host.persist, batch)
                        started, gc_before = time.perf_counter(), self.gc_pauses.total_s
                elif batch.must_sync():
                    host.persist(batch, wait=False)  # only commit indexes: no need to wait
                # Acks and votes leave before the apply, which may take a while.
                self._send(batch.late, now=True)
                applying = time.perf_counter()
                host.apply(batch)
                self._timed_step(batch, started, applying, gc_before)
                # Let the loop flush the coalesced writes and read what arrived before the
                # next batch: replies go out now, and the next batch is a bigger one.
                await asyncio.sleep(self.config.batch_wait)
                continue
            self._wake = loop.create_future()
            handle = loop.call_at(next_tick, self._wakeup)
            try:
                await self._wake
            finally:
                handle.cancel()
                self._wake = None

    def _timed_step(self, batch: Batch, started: float, applying: float, gc_before: float) -> None:
        """Count a driver step; log a slow one with where its time went."""
        ended = time.perf_counter()
        if self.step_times.record(ended - started):
            log.warning(
                "event=slow_driver_step ms=%.0f before_apply_ms=%.0f apply_ms=%.0f gc_ms=%.0f "
                "groups=%d entries=%d", (ended - started) * 1000, (applying - started) * 1000,
                (ended - applying) * 1000, (self.gc_pauses.total_s - gc_before) * 1000,
                len(batch.readies), sum(len(rd.committed_entries) for _, rd in batch.readies),
            )

    def _restore_in_background(
        self, gid: int, work: Callable[[], None], then: Callable[[BaseException | None], None]
    ) -> None:
        """ReplicaHost.restore_in_background: ``work`` on the restore thread, ``then`` here."""
        started = time.monotonic()

        def restored(future: asyncio.Future) -> None:
            if self._stopping:
                return  # the node is closing its files: the restart applies the snapshot
            error = None if future.cancelled() else future.exception()
            try:
                then(error)
            except BaseException:
                # Crash-only, as the driver: a state half replaced must not serve.
                _exit_for_restart(f"restoring a snapshot of shard group {gid} failed")
            log.info("restored a snapshot of shard group %d in %.2fs (off the loop)",
                     gid, time.monotonic() - started)
            self._wakeup()

        if self._stopping:
            return  # the restart restores it (the snapshot is persisted)
        future = asyncio.get_running_loop().run_in_executor(self._restorer, work)
        future.add_done_callback(restored)

    def _send(self, messages: list[Message], *, now: bool = False) -> None:
        """Send Raft messages, one frame per peer; with ``now``, written to the sockets at
        once instead of when the loop next turns."""
        if not messages:
            return
        by_peer: dict[int, list] = defaultdict(list)
        for msg in messages:
            if is_install(msg):
                self.snapshots_out.send(msg)  # too big for a frame, maybe: in chunks
                continue
            by_peer[msg.to].append(msg.to_wire())
        self.counters["raft_messages_out"] += len(messages)
        self.counters["raft_frames_out"] += len(by_peer)
        for peer_id, wires in by_peer.items():
            peer = self._peer(peer_id)
            if peer is not None:
                peer.send(wires, now=now)

    def _peer(self, peer_id: int) -> _Peer | None:
        peer = self.peers.get(peer_id)
        if peer is None and peer_id != self.config.node_id:
            address = self.address_of(peer_id)
            if address is not None:
                peer = self.peers[peer_id] = _Peer(self, peer_id, address)
        return peer

    async def _peer_connection(self, peer_id: int) -> Connection | None:
        peer = self._peer(peer_id)
        return None if peer is None else await peer.connection()

    def _role_changed(self, gid: int, role: Role, leader: int | None) -> None:
        if role != Role.LEADER:
            self.snapshots_out.cancel_group(gid)  # the new leader sends its own

    def _lost_ack(self, gid: int, follower: int, acknowledged: int, ends: int) -> None:
        self.counters["followers_behind_their_acks"] += 1
        log.warning(
            "event=follower_lost_entries group=%d follower=%d acknowledged=%d log_ends=%d: the "
            "follower no longer holds entries it acknowledged (its data directory restored from "
            "an older copy, or a disk that lost written data); it is caught up again from this "
            "leader, but it may have voted twice in a term meanwhile", gid, follower, acknowledged, ends,
        )

    def _snapshot_sending(self, gid: int, to: int, active: bool) -> None:
        if self.host is not None:
            self.host.snapshot_sending(gid, to, active)

    def _snapshot_failed(self, gid: int, to: int) -> None:
        if self.host is not None:
            self.host.snapshot_failed(gid, to)
            self._wakeup()

    def address_of(self, node_id: int) -> str | None:
        found = self.config.peers.get(node_id)
        return found if found is not None else self.current_map().addresses.get(node_id)

    def on_snapshot_chunk(self, body: Any) -> None:
        """A piece of a snapshot image (one-way); the last one steps its Raft message."""
        self.snapshots_in.chunk(body)

    def _step_one(self, msg: Message) -> None:
        host = self.host
        assert host is not None
        host.step(msg)
        self._wakeup()

    def on_raft(self, body: Any) -> None:
        """A batch of Raft messages from a peer (one-way)."""
        if not (isinstance(body, list) and len(body) == 2 and isinstance(body[1], list)):
            raise ProtocolError("a RAFT frame must be [from, [message...]]")
        host = self.host
        assert host is not None
        for wire in body[1]:
            try:
                msg = Message.from_wire(wire)
            except (ValueError, TypeError, IndexError) as exc:
                raise ProtocolError(f"malformed Raft message: {exc}") from None
            host.step(msg)
        self._wakeup()

    # --- requests ---------------------------------------------------------------------------

    def handle(self, kind: int, body: Any, respond: Callable[[Any], None]) -> None:
        """Serve one request: ``respond(reply)`` exactly once, at once or, for a proposal or
        a read, from its ReplicaHost completion callback (no asyncio future per request)."""
        try:
            if kind == PING:
                respond([OK, None])
            elif kind == STATUS:
                respond([OK, self.status()])
            elif kind == SHARD_MAP:
                respond([OK, self.shard_map()])
            elif not isinstance(body, list) or not body or not isinstance(body[0], int):
                raise ProtocolError(f"request of kind {kind} needs a [shard, ...] body")
            else:
                self._handle_shard(kind, body[0], body, respond)
        except (ProtocolError, NotLeader, Unavailable, Error) as exc:
            respond(_error_reply(exc))
        except (TypeError, ValueError, IndexError) as exc:
            respond(_error_reply(ProtocolError(f"malformed request of kind {kind}: {exc}")))

    def _handle_shard(self, kind: int, shard: int, body: list, respond: Callable[[Any], None]) -> None:
        """A request about one shard group (body ``[shard, ...]``); raises to refuse it."""
        if kind == READ:
            self._read(shard, body[1], respond, optimistic=len(body) > 2 and body[2] is True,
                       clocks_only=len(body) > 3 and body[3] is True)
        elif kind == COMMIT:
            request = self._stamped(body[1])
            done = _answer(_outcome_reply, respond)
            self._propose_to(shard, CMD_COMMIT, [request], done, written_keys(request))
        elif kind == COMMIT_DECIDE:  # [shard, request, the other participants]
            request = self._stamped(body[1])
            others = [int(s) for s in body[2]] if len(body) > 2 else []
            done = self._then_finish(_answer(_outcome_reply, respond), shard, request["txid"], others)
            args = self.finishes.commit_decide_args(shard, request, others)
            self._propose_to(shard, CMD_COMMIT_DECIDE, args, done, written_keys(request))
        elif kind == PREPARE:
            request = self._stamped(body[1])
            done = _answer(lambda vote: [OK, vote], respond)
            self._propose_to(
                shard, CMD_PREPARE, [request, int(body[2]), list(body[3])], done, written_keys(request)
            )
        elif kind == DECIDE:  # [shard, txid, commit, the timestamp of its request]
            if body[2] is not False:
                # Only COMMIT_DECIDE records a commit: it knows the participants that must
                # apply it before the decision may be forgotten (ShardState.unfinished).
                raise ProtocolError("DECIDE records an abort only; a commit is COMMIT_DECIDE")
            done = _answer(lambda d: [OK, d], respond)
            stamp = [int(body[3])] if len(body) > 3 else []
            for timestamp in stamp:
                self._check_not_ahead(timestamp)
            self._propose_to(shard, CMD_DECIDE, [int(body[1]), False, *stamp], done)
        elif kind == FINISH:
            done = _answer(_outcome_reply, respond)
            self._propose_to(shard, CMD_FINISH, [int(body[1]), bool(body[2])], done)
        elif kind == SCAN:  # [shard, prefix, start, end, limit(, deleted, page bytes)]
            deleted = len(body) > 5 and body[5] is True
            self._scan(shard, [*body[1:5], deleted, body[6] if len(body) > 6 else None], respond)
        elif kind == EXPORT:  # [shard, export id, "begin", prefix, start, end | "next", page | "end"]
            host = self.host
            assert host is not None
            done = _answer(lambda reply: [OK, reply], respond)
            step = str(body[2])
            key_range = KeyRange.from_wire(body[3:6]) if step == "begin" else EVERY_KEY
            page = int(body[3]) if step == "next" else 0
            host.export(shard, int(body[1]), step, self.config.scan_page_bytes, done, key_range, page)
            self._wakeup()
        elif kind == JOIN:
            self._join(int(body[1]), str(body[2]), respond)
        elif kind == LEAVE:
            self._leave(int(body[1]), respond)
        elif kind == MEMBERS:
            respond([OK, self.host.members(shard)])
        elif kind == CONF:
            self._conf(shard, str(body[1]), int(body[2]), respond)
        elif kind == HOST:
            if shard not in self.host.groups:
                self.host.add_group(shard, None, MetaState if shard == META_GROUP else None)
                log.info("hosting an empty replica of shard %d, to be filled by its leader", shard)
            respond([OK, None])
        elif kind == DROP:
            # Only once the group's leader confirms it: a DROP that arrives late, after this
            # node was added to the group again, must not delete a member's data.
            if shard in self.host.groups:
                self._background_task(self._drop_if_removed(shard))
            respond([OK, None])
        elif kind == RESOLVER:
            name = None if body[2] is None else str(body[2])
            done = _answer(_outcome_reply, respond)
            self._propose_to(shard, CMD_RESOLVER, [str(body[1]), name], done)
        elif kind == RESOLVERS:
            host = self.host
            assert host is not None
            host.read(shard, lambda state: dict(state.resolver_names), (), _answer(lambda names: [OK, names], respond))
            self._wakeup()
        elif kind == WIPE:
            self._propose_to(shard, CMD_WIPE, [], _answer(_outcome_reply, respond))
        elif kind == LOAD:  # [shard, [key update wire...]]: this node coordinates its clocks
            updates = [_loadable(KeyUpdate.from_wire(u)).to_wire() for u in body[1]]
            done = _answer(_outcome_reply, respond)
            self._propose_to(shard, CMD_LOAD, [updates, self.config.node_id], done, [u[0] for u in updates])
        else:
            raise ProtocolError(f"unknown request kind {kind}")

    def _ask(self, kind: int, body: list) -> asyncio.Future:
        """A request of the node's own tasks, served as a client's: the future of its reply.
        (Only these few pay for a future; a client's request is answered by its callback.)"""
        fut = asyncio.get_running_loop().create_future()

        def respond(reply: Any) -> None:
            if not fut.done():  # done: the asker stopped waiting (timed out)
                fut.set_result(reply)

        self.handle(kind, body, respond)
        return fut

    def _stamped(self, wire: Any) -> dict:
        """The request's wire form with this node as its coordinator (whose clock entry a
        write bumps). Validated by decoding it once; the proposal carries the client's
        encoding of reads and writes as they came, not a decode-and-re-encode of them."""
        CommitRequest.from_wire(wire)  # raises ProtocolError on a malformed request
        self._check_not_ahead(wire["ts"])
        stamped = {
            "txid": wire["txid"], "coord": self.config.node_id, "iso": wire["iso"],
            "ts": wire["ts"], "reads": wire["reads"], "writes": wire["writes"],
        }
        if "ranges" in wire:  # a consistent scan's lock
            stamped["ranges"] = wire["ranges"]
        return stamped

    def _check_not_ahead(self, timestamp: int) -> None:
        """InvalidArgument for a request timestamp over MAX_CLOCK_AHEAD_S ahead of this clock."""
        ahead = HybridClock.seconds(timestamp) - time.time()
        if ahead > MAX_CLOCK_AHEAD_S:
            raise InvalidArgument(
                f"the transaction's timestamp is {ahead:,.1f} s ahead of node "
                f"{self.config.node_id}'s clock, which accepts at most {MAX_CLOCK_AHEAD_S:g} s: "
                "the client's clock (or this node's) is wrong; nothing was applied"
            )

    def _propose_to(
        self, shard: int, tag: str, args: list, done: Done, writes: tuple[str, ...] = ()
    ) -> None:
        """Propose a shard command; ``done(result, error)`` once applied (see ReplicaHost)."""
        host = self.host
        assert host is not None
        host.propose(shard, tag, args, done, writes)
        self._wakeup()

    def _read(
        self, shard: int, keys: Any, respond: Callable[[Any], None], *, optimistic: bool, clocks_only: bool = False
    ) -> None:
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ProtocolError("READ needs a list of str keys")
        host = self.host
        assert host is not None

        def versions(state: ShardState) -> list:
            if clocks_only:  # [clock, timestamp]: a version without its value
                return [state.get(k).to_wire()[:2] for k in keys]
            return [state.get(k).to_wire() for k in keys]

        if optimistic:
            answered, result = host.read_now(shard, versions, tuple(keys))
            if answered:
                respond([OK, result])
                return
        host.read(shard, versions, tuple(keys), _answer(lambda result: [OK, result], respond))
        self._wakeup()

    def _scan(self, shard: int, args: list, respond: Callable[[Any], None]) -> None:
        """A scan's reply (a page of it: shard.scan_reply), once no prepared transaction
        holds a key of the range from where it starts."""
        host = self.host
        assert host is not None
        prefix, start, end, limit, _, page_bytes = args
        if not (
            isinstance(prefix, str) and all(b is None or isinstance(b, str) for b in (start, end))
            and (limit is None or (type(limit) is int and limit >= 0))
            and (page_bytes is None or (type(page_bytes) is int and page_bytes > 0))
        ):
            raise ProtocolError(
                "SCAN needs a str prefix, str or None bounds, an int >= 0 or None limit and"
                " an int > 0 or None page size"
            )
        page_bytes = self.config.scan_page_bytes
        host.read(
            shard, lambda state: scan_reply(state, args, page_bytes), KeyRange(prefix, start, end),
            _answer(lambda page: [OK, page], respond),
        )
        self._wakeup()

    # --- 2PC: finishing a decided transaction, and recovery --------------------------------------

    def _then_finish(self, done: Done, coordinator: int, txid: int, others: list[int]) -> Done:
        """``done`` for COMMIT_DECIDE, then FINISH on the other participants (_finish_decided)."""
        if not others:
            return done

        def decided(outcome: Any, error: BaseException | None) -> None:
            done(outcome, error)
            commit = None if error is not None else recorded_decision(outcome)
            if commit is not None:  # recorded (not refused on a lock, not unknown)
                self._finish_decided(commit, coordinator, txid, others)

        return decided

    def _finish_decided(self, commit: bool, coordinator: int, txid: int, shards: list[int]) -> None:
        """The coordinator shard recorded its decision: tell the other participants.

        Done here rather than by the client: a participant led by this node finishes with a
        local proposal (no network), and the keys it locked are released one client round
        trip sooner. Only a recorded decision is passed on; when the outcome is unknown
        (leadership lost), the participants settle it with the coordinator shard. A commit
        is released on the coordinator shard once every participant answered (FinishTracker).
        """
        if commit and not self.finishes.start(coordinator, txid, shards):
            return  # a round for it is under way
        for shard in shards:
            answered = partial(self._finish_answered, coordinator, txid, shard)
            group = self.host.groups.get(shard) if self.host is not None else None
            if group is not None and group.raft.is_leader():
                try:
                    self._propose_to(shard, CMD_FINISH, [txid, commit], answered)
                    continue
                except (NotLeader, Unavailable):
                    pass  # leadership moved just now: go through the router
            self._background_task(self._finish_elsewhere(shard, txid, commit, answered))

    def _background_task(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` on the loop; cancelled if still running when the node stops."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _finish_answered(
        self, coordinator: int, txid: int, shard: int, outcome: Any, error: BaseException | None
    ) -> None:
        """The completion of one FINISH: counts towards releasing a commit (FinishTracker)."""
        self.finishes.answered(coordinator, txid, shard, error is None and outcome is None)

    async def _finish_elsewhere(self, shard: int, txid: int, commit: bool, answered: Done) -> None:
        try:
            outcome = await self.router.call(shard, FINISH, [shard, txid, commit])
        except Exception as exc:  # noqa: BLE001 - any failure: recovery or the sweep see to it
            answered(None, exc)
        else:
            answered(outcome, None)

    def _sweep(self, now: float) -> None:
        """Release the commits every participant applied that no COMMIT_DECIDE carried;
        send FINISH again for those unfinished too long (a lost FINISH or answer, or decided
        under an earlier leader); settle the transactions prepared too long (pykv.replica
        .finishing.sweep)."""
        host = self.host
        assert host is not None
        after = self.config.recovery_after
        self._orphans.expire(now, after)
        work = sweep(
            host.groups, self.finishes, now, after, self._resolving, skip=(META_GROUP,),
            orphans=self._orphans,
        )
        for gid, txids in work.releases:
            with contextlib.suppress(NotLeader, Unavailable):  # the next leader sweeps
                self._propose_to(gid, CMD_RELEASE, [txids], _nobody_waits)
        for gid, txid, others in work.finish_again:
            self._finish_decided(True, gid, txid, others)
        self._start_settling(work.settle)

    def _start_settling(self, settle: list[tuple[int, int, Prepared]]) -> None:
        for gid, txid, prepared in settle:
            self._resolving.add((gid, txid))
            # Settlings begun because the client's connection closed, or because it waited.
            self.counters["settles_orphaned" if (gid, txid) in self._orphans else "settles_overdue"] += 1
            self._background_task(self._settle(
                gid, txid, prepared.coordinator_shard, prepared.request.timestamp
            ))

    def orphaned(self, prepares: list[tuple[int, int]]) -> None:
        """A client connection closed: settle the transactions it prepared here (shard,
        txid) now, rather than recovery_after later, if still undecided. Its client may
        have died between prepare and decision (or a scanner holding a range lock), and
        the prepared keys stay locked until they are settled. A prepare not yet applied is
        caught by a sweep within recovery_after, when this is forgotten."""
        if self.host is None or self._stopping:
            return
        self._orphans.mark(prepares, time.monotonic())
        self._start_settling(orphans_to_settle(self.host.groups, prepares, self._resolving))

    # --- 2PC recovery ---------------------------------------------------------------------------

    async def _recover_prepared(self) -> None:
        """Sweep (``_sweep``) every recovery_after / 4 seconds, until the node stops."""
        while not self._stopping:
            await asyncio.sleep(self.config.recovery_after / 4)
            self._sweep(time.monotonic())

    async def _settle(self, gid: int, txid: int, coordinator_shard: int, timestamp: int) -> None:
        try:
            # Ask for abort; the coordinator shard returns whatever was recorded first (it
            # keeps a commit until every participant applied it: see FinishTracker).
            decision = await self.router.call(
                coordinator_shard, DECIDE, [coordinator_shard, txid, False, timestamp]
            )
            reply = await asyncio.wait_for(self._ask(FINISH, [gid, txid, bool(decision)]), 5.0)
            # Applied, the outcome is the transaction's: OK, or TransactionConflict (aborted).
            if reply[0] != OK and reply[1] != "TransactionConflict":
                log.warning("could not settle transaction %d on shard %d yet: %s", txid, gid, reply)
                return
            log.info("settled prepared transaction %d on shard %d: %s", txid, gid,
                     "commit" if decision else "abort")
        except (Error, asyncio.TimeoutError, OSError) as exc:
            log.warning("could not settle transaction %d on shard %d yet: %s", txid, gid, exc)
        finally:
            self._resolving.discard((gid, txid))

    # --- diagnostics ------------------------------------------------------------------------------

    def status(self) -> dict:
        host = self.host
        assert host is not None
        return {
            "node_id": self.config.node_id,
            "cluster_id": self.cluster_id,
            "address": self.config.listen,
            "pid": os.getpid(),
            "groups": {str(g): s for g, s in host.status().items() if g != META_GROUP},
            "meta": host.status().get(META_GROUP),  # this node's metadata replica, if any
            "map_version": self.current_map().version,
            "map_nodes": list(self.current_map().nodes),
            "removed": self.removed(),
            "pending_moves": self.moves_pending(),
            "counters": dict(self.counters),
            # InstallSnapshot images streamed to peers to the end, and received whole.
            "snapshots": {"sent": self.snapshots_out.sent, "received": self.snapshots_in.received},
            "exports": host.exports_under_way(),  # views that backups and busy scans are reading
            "reads": self.config.reads,
            # The read cache of the shards' values (state "storage"; None in memory).
            "cache": None if self._cache is None else self._cache.stats(),
            "wal": host.log.wal_status(),  # the Raft log of every group here
            "driver": self.step_times.as_dict(),
            "gc": self.gc_pauses.as_dict(),
            "rss_bytes": resident_bytes(),
        }

    def removed(self) -> bool:
        """Taken out of the map while it was down (cluster remove, or --dead-after).

        Known once the node has dropped every replica it had (each only after its group's
        leader confirmed it no longer counts this node): the map alone is not proof, since
        right after a restart the node may still route by a map older than its own joining.
        Such a node never joins again; only an empty data dir can come back.
        """
        host = self.host
        return (
            not self._may_join and host is not None and not host.groups
            and self.config.node_id not in self.current_map().nodes
        )

    @property
    def meta_voters(self) -> list[int]:
        """The metadata group's voters: from its Raft configuration when this node hosts it,
        else (or while it waits, empty, for the leader's snapshot) as another node reported."""
        meta = self.host.groups.get(META_GROUP) if self.host is not None else None
        if meta is not None and meta.raft.conf.voters:
            return sorted(meta.raft.conf.voters)
        return list(self._learned_meta)

    def current_map(self) -> ShardMap:
        """The newest shard map this node knows: the metadata group's, or a learned one."""
        host = self.host
        meta = host.groups.get(META_GROUP) if host is not None else None
        found = meta.state.shard_map if meta is not None else None
        learned = self._learned_map
        best = found or self.founding_map
        if learned is not None and learned.version > best.version:
            best = learned
        return best

    def shard_map(self) -> dict:
        """The map clients route by: placement per the current map, plus the members this
        node sees in the groups it hosts (a group in the middle of a move has both)."""
        host = self.host
        assert host is not None
        current = self.current_map()
        shards, leaders = [], []
        for shard in range(current.partitions):
            members = list(current.replicas_of(shard))
            group = host.groups.get(shard)
            if group is not None:
                members += [n for n in sorted(group.raft.conf.members()) if n not in members]
            shards.append(members)
            leaders.append(host.leader_of(shard))
        nodes = {**self.config.peers, **current.addresses}
        return {
            "version": current.version,
            "partitions": current.partitions,
            "vnodes": current.vnodes,
            "replicas": current.replicas,
            "nodes": {str(k): v for k, v in nodes.items()},  # also taken out ones: routing
            "members": list(current.nodes),  # the nodes of the ring now
            "cluster": self.cluster_id,  # a client learns it here, and names it in its HELLOs
            "shards": shards,
            "leaders": leaders,
            "meta": self.meta_voters,
            "map": current.encode(),
        }

    # --- membership: joining, and moving replicas to where the map places them -----------------

    def _join(self, node_id: int, address: str, respond: Callable[[Any], None]) -> None:
        current = self.current_map()
        if node_id in current.nodes:
            # A member asking again lost its replicas (_rejoin_after_data_loss): place them now.
            self._next_placement_check = 0.0
            respond([OK, current.version])
        else:
            self._set_map(current.with_node(node_id, address), respond)

    def _leave(self, node_id: int, respond: Callable[[Any], None]) -> None:
        current = self.current_map()
        if node_id not in current.nodes:
            respond([OK, current.version])
        elif len(current.nodes) <= 1:
            raise Unavailable("cannot remove the last node of the cluster")
        else:
            self._set_map(current.without_node(node_id), respond)

    def _set_map(self, proposed: ShardMap, respond: Callable[[Any], None]) -> None:
        """Propose the next shard map; the reply is its version, or why it was refused."""

        def reply(outcome: Any) -> list:
            return [OK, proposed.version] if outcome is None else _outcome_reply(outcome)

        self._propose_to(META_GROUP, SET_MAP, [proposed.encode()], _answer(reply, respond))

    def _conf(self, shard: int, step: str, node: int, respond: Callable[[Any], None]) -> None:
        try:
            kind = StepKind(step)
        except ValueError:
            raise ProtocolError(f"unknown membership step {step!r}") from None
        self.host.change_membership(shard, Step(kind, node), _answer(lambda _: [OK, None], respond))
        self._wakeup()

    async def _membership(self) -> None:
        """Join the map if this node is new; on the metadata leader, move replicas (of the
        data shards and of the metadata group itself) to where the map places them."""
        while not self._stopping:
            await asyncio.sleep(0.3)
            try:
                await self._refresh_learned_map()
                self._check_partitions()
                in_map = self.config.node_id in self.current_map().nodes
                if in_map and self._lost_data:
                    await self._rejoin_after_data_loss()
                if in_map:
                    self._may_join = False  # a node taken out later must not join again
                elif self._may_join:
                    await self.router.call(
                        META_GROUP, JOIN, [META_GROUP, self.config.node_id, self.config.listen]
                    )
                    continue
                meta = self.host.groups.get(META_GROUP) if self.host else None
                if meta is not None and meta.raft.is_leader():
                    if self._placement_check_due(meta.raft.term):
                        await self._rebalance_round()
                else:
                    self.pending_moves = 0
                await self._drop_stale_replicas()
            except (Error, OSError, asyncio.TimeoutError) as exc:
                log.debug("membership round failed: %s", exc)

    async def _rejoin_after_data_loss(self) -> None:
        """Leave every group whose configuration still names this node (it lost its copy,
        and its term and vote with it): each group's leader removes it, with the majority
        of the others. The metadata leader's placement checks then add it back as a new
        learner, filled by a snapshot, and promote it. Done once no group names it."""
        me = self.config.node_id
        host = self.host
        assert host is not None
        twin = await self._running_twin()
        if twin is not None:
            # A second process given this id (a copied command line, a wrong --id) would take
            # every replica away from the node that holds them, again and again.
            _exit_misconfigured(
                f"event=duplicate_node node={me}: node {me} already runs at {twin['address']} "
                f"(pid {twin.get('pid')}) and holds its replicas; this process, at "
                f"{self.config.peers[me]}, would take them away. Stop one of the two"
            )
        # Not the groups added back already (HOST): replicas of this incarnation.
        gids = [g for g in [*range(self.current_map().partitions), META_GROUP] if g not in host.groups]

        async def leave_if_named(gid: int) -> bool:
            info = await self.router.call(gid, MEMBERS, [gid], timeout=2.0)
            if me not in info["voters"] and me not in info["learners"]:
                return False
            await self.router.call(gid, CONF, [gid, StepKind.REMOVE.value, me], timeout=5.0)
            log.info("shard %d: left the group (this node lost its data), to be added back", gid)
            return True

        named = sum(await asyncio.gather(*(leave_if_named(g) for g in gids)))
        if named:
            # The metadata leader adds the replicas back at its next placement check: now.
            await self.router.call(META_GROUP, JOIN, [META_GROUP, me, self.config.listen])
        else:
            self._lost_data = False
            log.info("event=rejoined node=%d: no group names the lost replicas any more", me)

    def _check_partitions(self) -> None:
        """Exit if the cluster has another number of partitions than this node was given: a
        replica's state machine depends on it (how many txids it remembers), and replicas
        that disagree on it would diverge."""
        cluster_map = self._learned_map or self.current_map()
        if cluster_map.partitions != self.config.partitions:
            _exit_misconfigured(
                f"event=wrong_partitions node={self.config.node_id}: the cluster has "
                f"{cluster_map.partitions} partitions, fixed for its life, and this node was "
                f"started with --partitions {self.config.partitions}: remove "
                f"{self.config.data_dir} and start it again with --partitions {cluster_map.partitions}"
            )

    async def _running_twin(self) -> dict | None:
        """The status of another live process serving this node's id at the address the
        cluster's shard map gives it, if that is another address than this one's."""
        me = self.config.node_id
        cluster_map = self._learned_map or self.current_map()  # as the others have it
        address = cluster_map.addresses.get(me)
        if address is None or address == self.config.peers[me]:
            return None  # this process listens there: nobody else can
        try:
            status = await self.router.call_address(address, STATUS, None, 2.0)
        except (Error, OSError):
            return None  # nobody there: the node moved
        return status if status.get("node_id") == me else None

    def _placement_check_due(self, term: int) -> bool:
        """Whether the metadata leader checks every group's placement in this round.

        Each check asks every group's leader for its members: with hundreds of shards that
        is most of what an idle cluster does. So it runs every round only while a map change
        is not yet carried out (or leadership is new); once the groups are where the map
        places them, and the map has not changed, only every RECHECK_PLACED_S, as a safety
        net (with the map unchanged no replica moves by itself).
        """
        now = asyncio.get_running_loop().time()
        settled = self._balanced_version == self.current_map().version
        if settled and term == self._placement_term and now < self._next_placement_check:
            return False
        self._placement_term = term
        self._next_placement_check = now + RECHECK_PLACED_S
        return True

    async def _drop_stale_replicas(self) -> None:
        """Drop the replicas (of data shards and of the metadata group) this node hosts but
        no longer belongs to.

        The leader that removes a replica tells it with DROP, once; a node that was down
        then (removed while it was down) restarts with the group in its WAL and would keep
        it forever, campaigning in vain. So a replica the map does not place here asks the
        group's leader whether it is still a member, and goes when it is not.
        """
        host = self.host
        assert host is not None
        current = self.current_map()
        me = self.config.node_id
        for gid, group in list(host.groups.items()):
            if group.raft.is_leader() or (gid != META_GROUP and gid >= current.partitions):
                continue
            if gid == META_GROUP:
                # The target the metadata leader moves the group to, as far as this node can
                # tell; a node the map no longer names is never in it.
                placed = me in meta_replicas(current, self.meta_voters)
            else:
                placed = me in current.replicas_of(gid)
            if not placed:
                await self._drop_if_removed(gid)

    async def _drop_if_removed(self, gid: int) -> None:
        """Drop this node's replica of ``gid`` if the group's leader no longer counts it (no
        leader to ask: the next sweep asks again)."""
        me = self.config.node_id
        try:
            info = await self.router.call(gid, MEMBERS, [gid], timeout=1.0)
        except (Error, OSError, asyncio.TimeoutError) as exc:
            log.debug("shard %d: cannot tell whether this node still belongs: %s", gid, exc)
            return
        if me not in info["voters"] and me not in info["learners"]:
            if self._drop_group(gid, info["voters"]):
                log.info("dropped shard %d: its leader %s no longer counts this node", gid, info["leader"])

    def _drop_group(self, gid: int, voters: list[int] | None = None) -> bool:
        """Stop hosting group ``gid`` (this node left it); False when it was not hosted.

        ``voters`` are the group's voters as its leader reported them, if known.
        """
        host = self.host
        assert host is not None
        group = host.groups.get(gid)
        if group is None:
            return False
        if gid == META_GROUP:
            # From now on the map is learned from the group's members: start from the newest
            # one this node applied (or learned), never the founding map.
            self._learned_map = self.current_map()
            if voters is None:
                voters = sorted(group.raft.conf.voters)
            others = [n for n in voters if n != self.config.node_id]
            self._learned_meta = others or self._learned_meta
        host.remove_group(gid)
        return True

    async def _refresh_learned_map(self) -> None:
        """Outside the metadata group (or only learning in it, or hearing from no leader of
        it, as a member removed while it was down would not): learn the map and the group's
        voters from another node, asking the group's members first (they know the newest)."""
        meta = self.host.groups.get(META_GROUP) if self.host else None
        me = self.config.node_id
        if meta is not None and me in meta.raft.conf.voters and meta.raft.leader_id is not None:
            return
        addresses = [self.address_of(n) for n in self.meta_voters if n != me]
        addresses += [a for n, a in self.config.peers.items() if n != me]
        self.router.seeds = [a for a in dict.fromkeys(addresses) if a is not None]
        view = await self.router.refresh_map()
        if view.encoded is not None:
            learned = ShardMap.decode(view.encoded)
            if self._learned_map is None or learned.version >= self._learned_map.version:
                self._learned_map = learned
                if view.meta:
                    self._learned_meta = list(view.meta)

    async def _rebalance_round(self) -> None:
        """One membership step for every group not yet where the map places it: the data
        shards (their ring replicas) and the metadata group (``meta_replicas``)."""
        current = self.current_map()
        self.router.map = ShardMapView.from_wire(self.shard_map())
        self.router.seeds = [a for a in current.addresses.values()]
        meta = self.host.groups[META_GROUP]
        targets = {p: list(current.replicas_of(p)) for p in range(current.partitions)}
        targets[META_GROUP] = meta_replicas(current, meta.raft.conf.members())
        results = await asyncio.gather(
            *(self._reconcile(gid, target) for gid, target in targets.items()),
            return_exceptions=True,
        )
        for gid, result in zip(targets, results, strict=True):
            if isinstance(result, BaseException) and not isinstance(
                result, (Error, OSError, asyncio.TimeoutError)
            ):
                # Not the network or a refusal for now: a bug, which would otherwise only
                # show as shards moving for ever.
                log.error("shard %d: placement step failed", gid, exc_info=result)
        self.pending_moves = sum(1 for r in results if r is not True)
        # Moves under way (a replica was lost, not only when the map changed): check again
        # next round, not only after RECHECK_PLACED_S, as each move is several steps.
        self._balanced_version = -1 if self.pending_moves else current.version

    # --- membership: replacing dead members -----------------------------------------------------

    async def _replace_dead_members(self) -> None:
        """On the metadata leader: probe every member of the map, and take out one that has
        been unreachable for ``dead_after`` seconds (pykv.cluster.liveness says whom and
        when), so that its shards move to live nodes by the usual rebalancing."""
        dead_after = self.config.dead_after
        if dead_after <= 0:
            return
        every = min(1.0, dead_after / 5)
        # Live = answered one of the last ~3 probes: a busy node may miss one.
        watch = _Silence(live_within=min(dead_after, 3 * every))
        while not self._stopping:
            await asyncio.sleep(every)
            meta = self.host.groups.get(META_GROUP) if self.host else None
            if meta is None or not meta.raft.is_leader():
                watch.term = None
                continue
            try:
                await self._watch_round(meta.raft.term, watch, timeout=max(0.5, every))
            except (Error, OSError, asyncio.TimeoutError) as exc:
                log.debug("dead-member round failed: %s", exc)

    async def _watch_round(self, term: int, watch: _Silence, timeout: float) -> None:
        current = self.current_map()
        # Started at the election (not at this node's start): a new leader that heard nobody
        # yet must not take everyone for dead.
        watch.start(term, current.version, time.monotonic())
        others = [n for n in current.nodes if n != self.config.node_id]
        sent = time.monotonic()
        answered = await asyncio.gather(*(self._probe(n, timeout) for n in others))
        watch.probed(dict(zip(others, answered, strict=True)), sent)
        now = time.monotonic()
        silence = watch.silence(now)
        verdict = decide_removal(
            current.nodes, silence, replicas=current.replicas,
            dead_after=self.config.dead_after, live_within=watch.live_within,
            moving=self.moves_pending() > 0, map_age=now - watch.map_since,
        )
        if verdict.node is None:
            if verdict.dead and watch.changed(verdict):
                log.warning("event=dead_member_kept nodes=%s live=%s replicas=%d map_version=%d "
                            "reason=%r", _ids(verdict.dead), _ids(verdict.live), current.replicas,
                            current.version, verdict.reason)
            return
        log.warning("event=dead_member_removed node=%d silent_s=%.1f dead_after_s=%g live=%s "
                    "replicas=%d map_version=%d", verdict.node, silence[verdict.node],
                    self.config.dead_after, _ids(verdict.live), current.replicas, current.version)
        # Exactly what `pykv cluster remove` asks for (LEAVE): one code path for both.
        reply = await asyncio.wait_for(self._ask(LEAVE, [META_GROUP, verdict.node]), 5.0)
        if reply[0] != OK:
            log.warning("could not remove dead member %d: %s", verdict.node, reply[1:])

    async def _probe(self, node: int, timeout: float) -> bool:
        """Whether ``node`` answers a PING within ``timeout`` (its loop is alive)."""
        address = self.address_of(node)
        if address is None:
            return False
        try:
            await asyncio.wait_for(self.router.call_address(address, PING, None, timeout), timeout)
        except (Unavailable, Timeout, OSError, asyncio.TimeoutError):
            return False
        except Error:
            return True  # it answered, if with an error (a node from before PING refuses it)
        return True

    def moves_pending(self) -> int:
        """Shards not yet where the map places them (known on the metadata leader only)."""
        meta = self.host.groups.get(META_GROUP) if self.host else None
        if meta is None or not meta.raft.is_leader():
            return 0
        if self._balanced_version != self.current_map().version:
            return max(1, self.pending_moves)
        return self.pending_moves

    async def _reconcile(self, shard: int, target: list[int]) -> bool:
        """One membership step of group ``shard`` (a data shard or the metadata group)
        towards the replica set ``target``; True when it is there."""
        info = await self.router.call(shard, MEMBERS, [shard], timeout=2.0)
        step = next_step(info["voters"], info["learners"], info["leader"], target)
        if step is None:
            return True
        if step.kind in (StepKind.ADD_LEARNER, StepKind.PROMOTE):
            # The node must host the group; HOST is idempotent, and again before a promotion:
            # a learner that restarted before it persisted anything of the group forgot it.
            await self.router.call_address(self.address_of(step.node), HOST, [shard], 2.0)
        await self.router.call(shard, CONF, [shard, step.kind.value, step.node], timeout=5.0)
        log.info("shard %d: %s node %d (towards %s)", shard, step.kind.value, step.node, _ids(tuple(target)))
        if step.kind is StepKind.REMOVE:
            address = self.address_of(step.node)
            if address is not None:
                with contextlib.suppress(Error, OSError):
                    await self.router.call_address(address, DROP, [shard], 2.0)
        return False


class _Silence:
    """Since when each member has not answered the metadata leader's probes, with timers that
    start at its election; the clock is the server's, the rules pykv.cluster.liveness's."""

    def __init__(self, live_within: float) -> None:
        self.live_within = live_within
        self.term: int | None = None
        self.missing_since: dict[int, float] = {}  # member -> when a probe first went unanswered
        self.map_version = 0
        self.map_since = 0.0
        self._told: tuple = ()

    def start(self, term: int, map_version: int, now: float) -> None:
        """Restart every timer when leadership is new; note when the map last changed."""
        if term != self.term:
            self.term, self.missing_since, self._told = term, {}, ()
            self.map_version, self.map_since = map_version, now
        elif map_version != self.map_version:
            self.map_version, self.map_since = map_version, now

    def probed(self, answers: dict[int, bool], sent: float) -> None:
        """Probes sent at ``sent``: a member that answered is heard; one that did not is
        silent from then on (not from its last answer: it may have lived until ``sent``).
        ``answers`` covers every other member: a node out of the map is forgotten."""
        self.missing_since = {n: t for n, t in self.missing_since.items() if n in answers}
        for node, answered in answers.items():
            if answered:
                self.missing_since.pop(node, None)
            else:
                self.missing_since.setdefault(node, sent)

    def silence(self, now: float) -> dict[int, float]:
        return {n: now - since for n, since in self.missing_since.items()}

    def changed(self, verdict: Removal) -> bool:
        """Whether this verdict differs from the last one logged (log a decision once)."""
        told = (verdict.dead, verdict.reason)
        if told == self._told:
            return False
        self._told = told
        return True


def _ids(nodes: tuple[int, ...]) -> str:
    return ",".join(str(n) for n in nodes) or "-"


def log_start_failure(node_id: int, exc: BaseException) -> None:
    """The one log line of a node that cannot start (`cluster up` shows the last line)."""
    log.error("event=start_failed node=%d: %s: %s", node_id, type(exc).__name__, exc)


async def serve_forever(config: NodeConfig) -> None:
    """Run a node until SIGTERM or SIGINT."""
    # A node keeps many long-lived objects: with the default thresholds a full collection
    # every ~70k allocations scanned them all, 11-37 ms of CPU per second per node under the
    # standard bench and pauses up to 175 ms. 10,000: 3-7 ms/s, pauses up to 26 ms. Freezing
    # what recovery built skips it for good. The largest sets are kept out of the
    # collector's sight instead (RaftLog's rows, Remembered's arrays and atomic values).
    gc.set_threshold(10_000, 10, 10)
    try:
        node = Node(config)
        await node.start()
    except CorruptData as exc:
        # Refuse to serve from damaged data, and say how to rebuild it (the last line of the
        # log, which `cluster up` shows).
        log.error("event=corrupt_data node=%d: %s. To rebuild this node from the other replicas, "
                  "remove %s and start it again (`pykv cluster up`: it rejoins as a new replica)",
                  config.node_id, exc, config.data_dir)
        raise SystemExit(2) from None
    except (Error, OSError) as exc:  # a bad option, the port taken, a directory it cannot use
        log_start_failure(config.node_id, exc)
        raise SystemExit(2) from None
    gc.freeze()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await node.stop()
    log.info("event=stopped node=%d: shut down cleanly", config.node_id)


__all__ = ["Node", "NodeConfig", "log_start_failure", "serve_forever"]
