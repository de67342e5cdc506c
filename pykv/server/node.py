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

Multi-shard transactions are coordinated by the client (pykv.client) over the shards'
Raft groups; the node's part is a recovery task: a prepared transaction left undecided
for ``recovery_after`` seconds is settled by asking its coordinator shard to record a
decision (the first recorded decision wins, normally the client's), then finishing it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import signal
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pykv.client.router import Router
from pykv.client.transport import (
    COMMIT,
    COMMIT_DECIDE,
    DECIDE,
    FAILED,
    FINISH,
    OK,
    PREPARE,
    RAFT,
    READ,
    REDIRECT,
    RESOLVER,
    SCAN,
    SHARD_MAP,
    STATUS,
    CoalescingWriter,
    Connection,
    parse_address,
    set_nodelay,
)
from pykv.cluster.ring import HashRing
from pykv.errors import Error, ProtocolError, Timeout, Unavailable
from pykv.net.framing import (
    DEFAULT_MAX_FRAME,
    HELLO,
    RESPONSE,
    FrameDecoder,
    check_hello,
    encode_frame,
    hello_frame,
)
from pykv.raft.errors import NotLeader
from pykv.raft.messages import Message
from pykv.raft.node import RaftConfig
from pykv.replica.durable import NodeLog
from pykv.replica.host import ReplicaHost
from pykv.replica.shard import COMMIT as CMD_COMMIT
from pykv.replica.shard import COMMIT_DECIDE as CMD_COMMIT_DECIDE
from pykv.replica.shard import DECIDE as CMD_DECIDE
from pykv.replica.shard import FINISH as CMD_FINISH
from pykv.replica.shard import PREPARE as CMD_PREPARE
from pykv.replica.shard import RESOLVER as CMD_RESOLVER
from pykv.txn.model import CommitRequest

log = logging.getLogger("pykv.node")


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
    heartbeat_ticks: int = 5
    fsync: str = "always"
    recovery_after: float = 2.0
    max_frame: int = DEFAULT_MAX_FRAME
    snapshot_every: int = 50_000
    # Persist on the loop thread (the WAL releases the GIL while it fsyncs) rather than
    # hopping to a worker thread: fewer wake-ups per batch, bigger batches.
    persist_inline: bool = True


class _Peer:
    """The outgoing link to one peer: connects lazily, reconnects with backoff, never blocks."""

    def __init__(self, node: Node, peer_id: int, address: str) -> None:
        self.node = node
        self.peer_id = peer_id
        self.address = address
        self.conn: Connection | None = None
        self._connecting = False
        self._next_try = 0.0

    def send(self, wires: list) -> None:
        conn = self.conn
        if conn is not None and not conn.closed:
            conn.send(RAFT, [self.node.config.node_id, wires])
            return
        loop = asyncio.get_running_loop()
        if not self._connecting and loop.time() >= self._next_try:
            self._connecting = True
            loop.create_task(self._connect())
        # Messages to an unreachable peer are dropped; Raft retransmits what matters.

    async def _connect(self) -> None:
        try:
            self.conn = await Connection.open(self.address, timeout=1.0, max_frame=self.node.config.max_frame)
        except (Unavailable, OSError):
            self._next_try = asyncio.get_running_loop().time() + 0.2
        finally:
            self._connecting = False


class _ServerProtocol(asyncio.Protocol):
    """The server side of one connection: HELLO first, then framed requests, any number in flight."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.decoder = FrameDecoder(node.config.max_frame)
        self.transport: asyncio.Transport | None = None
        self.writer: CoalescingWriter | None = None
        self.greeted = False
        self.peername = "?"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.writer = CoalescingWriter(transport)  # type: ignore[arg-type]
        set_nodelay(transport)
        self.peername = str(transport.get_extra_info("peername"))
        transport.write(hello_frame())  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.decoder.feed(data)
            for frame in frames:
                if not self.greeted:
                    check_hello(frame)
                    self.greeted = True
                    continue
                if frame.kind == HELLO:
                    raise ProtocolError("a second HELLO on one connection")
                self._dispatch(frame.kind, frame.request_id, frame.body)
            if self.decoder.error is not None:
                raise self.decoder.error
        except ProtocolError as exc:
            # A malformed, oversized or truncated frame closes this connection only.
            log.error("closing connection from %s: %s", self.peername, exc)
            assert self.transport is not None
            self.transport.abort()

    def eof_received(self) -> bool | None:
        try:
            self.decoder.check_eof()
        except ProtocolError as exc:
            log.error("connection from %s ended badly: %s", self.peername, exc)
        return None

    def _dispatch(self, kind: int, request_id: int, body: Any) -> None:
        if kind == RAFT:
            self.node.on_raft(body)
            return
        reply = self.node.handle(kind, body)
        if isinstance(reply, asyncio.Future):
            reply.add_done_callback(lambda fut: self._respond(request_id, _future_reply(fut)))
        else:
            self._respond(request_id, reply)

    def _respond(self, request_id: int, reply: Any) -> None:
        if request_id == 0 or self.transport is None or self.transport.is_closing():
            return
        try:
            frame = encode_frame(RESPONSE, reply, request_id=request_id, max_frame=self.node.config.max_frame)
        except ProtocolError as exc:
            frame = encode_frame(RESPONSE, [FAILED, "ProtocolError", str(exc)], request_id=request_id)
        self.writer.write(frame)


def _future_reply(fut: asyncio.Future) -> Any:
    if fut.cancelled():
        return [FAILED, "Unavailable", "request cancelled"]
    exc = fut.exception()
    if exc is None:
        return fut.result()
    return _error_reply(exc)


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
        self.ring = HashRing(
            config.initial or sorted(config.peers),
            partitions=config.partitions,
            vnodes=config.vnodes,
            replicas=config.replicas,
        )
        self.shard_map_version = 1
        self.host: ReplicaHost | None = None
        self.nodelog: NodeLog | None = None
        self.peers = {
            pid: _Peer(self, pid, addr) for pid, addr in config.peers.items() if pid != config.node_id
        }
        self._server: asyncio.AbstractServer | None = None
        self._tasks: list[asyncio.Task] = []
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pykv-persist")
        self._wake: asyncio.Future | None = None
        self._stopping = False
        self._resolving: set[tuple[int, int]] = set()
        self.router = Router(list(config.peers.values()), timeout=5.0)
        self.stopped = asyncio.Event()

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        self.nodelog = NodeLog(cfg.data_dir, fsync=cfg.fsync)
        raft_config = RaftConfig(
            election_ticks=cfg.election_ticks,
            heartbeat_ticks=cfg.heartbeat_ticks,
            max_inflight=256,
        )
        self.host = ReplicaHost(
            cfg.node_id,
            self.nodelog,
            raft_config=raft_config,
            rng=random.Random(int.from_bytes(os.urandom(8), "big")),
            clock=time.monotonic,
            snapshot_every=cfg.snapshot_every,
        )
        for shard in range(cfg.partitions):
            replicas = list(self.ring.replicas(shard))
            if cfg.node_id in replicas:
                self.host.add_group(shard, replicas)
        host, port = parse_address(cfg.listen)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _ServerProtocol(self), host, port, reuse_address=True)
        self._tasks.append(loop.create_task(self._drive()))
        self._tasks.append(loop.create_task(self._recover_prepared()))
        log.info("node %d listening on %s with %d groups", cfg.node_id, cfg.listen, len(self.host.groups))

    async def stop(self) -> None:
        self._stopping = True
        self._wakeup()
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.router.close()
        for peer in self.peers.values():
            if peer.conn is not None:
                peer.conn.close()
        self._io.shutdown(wait=True)
        if self.nodelog is not None:
            self.nodelog.close()
        self.stopped.set()

    # --- the driver loop --------------------------------------------------------------------

    def _wakeup(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        host = self.host
        assert host is not None
        tick = self.config.tick_ms / 1000.0
        next_tick = loop.time() + tick
        while not self._stopping:
            now = loop.time()
            if now >= next_tick:
                host.tick()
                next_tick = max(next_tick + tick, now + tick / 2)
            batch = host.collect()
            if batch.readies:
                self._send(batch.early)
                if batch.must_wait():
                    if self.config.persist_inline:
                        host.persist(batch)
                    else:
                        await loop.run_in_executor(self._io, host.persist, batch)
                elif batch.must_sync():
                    host.persist(batch, wait=False)  # only commit indexes: no need to wait
                self._send(batch.late)
                host.apply(batch)
                continue
            self._wake = loop.create_future()
            handle = loop.call_at(next_tick, self._wakeup)
            try:
                await self._wake
            finally:
                handle.cancel()
                self._wake = None

    def _send(self, messages: list[Message]) -> None:
        if not messages:
            return
        by_peer: dict[int, list] = defaultdict(list)
        for msg in messages:
            by_peer[msg.to].append(msg.to_wire())
        for peer_id, wires in by_peer.items():
            peer = self.peers.get(peer_id)
            if peer is not None:
                peer.send(wires)

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

    def handle(self, kind: int, body: Any) -> Any:
        """Serve one request: a reply now, or a future of the reply."""
        try:
            if kind == STATUS:
                return [OK, self.status()]
            if kind == SHARD_MAP:
                return [OK, self.shard_map()]
            if not isinstance(body, list) or not body or not isinstance(body[0], int):
                raise ProtocolError(f"request of kind {kind} needs a [shard, ...] body")
            shard = body[0]
            if kind == READ:
                return self._read(shard, body[1])
            if kind == COMMIT:
                request = self._stamped(body[1])
                return self._propose(shard, CMD_COMMIT, [request.to_wire()], _outcome_reply)
            if kind == COMMIT_DECIDE:
                request = self._stamped(body[1])
                return self._propose(shard, CMD_COMMIT_DECIDE, [request.to_wire()], _outcome_reply)
            if kind == PREPARE:
                request = self._stamped(body[1])
                return self._propose(
                    shard, CMD_PREPARE, [request.to_wire(), int(body[2]), list(body[3])],
                    lambda vote: [OK, vote],
                )
            if kind == DECIDE:
                return self._propose(shard, CMD_DECIDE, [int(body[1]), bool(body[2])], lambda d: [OK, d])
            if kind == FINISH:
                return self._propose(shard, CMD_FINISH, [int(body[1]), bool(body[2])], _outcome_reply)
            if kind == SCAN:
                return self._scan(shard, *body[1:5])
            if kind == RESOLVER:
                return self._propose(shard, CMD_RESOLVER, [str(body[1]), str(body[2])], _outcome_reply)
            raise ProtocolError(f"unknown request kind {kind}")
        except (ProtocolError, NotLeader, Unavailable, Error) as exc:
            return _error_reply(exc)
        except (TypeError, ValueError, IndexError) as exc:
            return _error_reply(ProtocolError(f"malformed request of kind {kind}: {exc}"))

    def _stamped(self, wire: Any) -> CommitRequest:
        """The request with this node as its coordinator (whose clock entry a write bumps)."""
        return dataclasses.replace(CommitRequest.from_wire(wire), coordinator=self.config.node_id)

    def _future(self, convert: Any) -> tuple[asyncio.Future, Any]:
        fut = asyncio.get_running_loop().create_future()

        def done(result: Any, error: BaseException | None) -> None:
            if fut.done():
                return
            if error is not None:
                fut.set_exception(error)
            else:
                try:
                    fut.set_result(convert(result))
                except Exception as exc:  # noqa: BLE001 - report, do not kill the loop
                    fut.set_exception(exc)

        return fut, done

    def _propose(self, shard: int, tag: str, args: list, convert: Any) -> asyncio.Future:
        host = self.host
        assert host is not None
        fut, done = self._future(convert)
        host.propose(shard, tag, args, done)
        self._wakeup()
        return fut

    def _read(self, shard: int, keys: Any) -> asyncio.Future:
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ProtocolError("READ needs a list of str keys")
        host = self.host
        assert host is not None
        fut, done = self._future(lambda versions: [OK, versions])
        host.read(shard, lambda state: [state.get(k).to_wire() for k in keys], tuple(keys), done)
        self._wakeup()
        return fut

    def _scan(self, shard: int, prefix: str, start: str | None, end: str | None, limit: int | None) -> asyncio.Future:
        host = self.host
        assert host is not None
        fut, done = self._future(lambda items: [OK, items])

        def fn(state: Any) -> list:
            return [[k, v.to_wire()] for k, v in state.scan(prefix, start, end, limit)]

        host.read(shard, fn, (), done)
        self._wakeup()
        return fut

    # --- 2PC recovery ---------------------------------------------------------------------------

    async def _recover_prepared(self) -> None:
        """Settle prepared transactions whose coordinator went quiet (crashed client)."""
        host = self.host
        assert host is not None
        while not self._stopping:
            await asyncio.sleep(self.config.recovery_after / 4)
            now = time.monotonic()
            for gid, group in list(host.groups.items()):
                if not group.raft.is_leader():
                    continue
                for txid, prepared in list(group.state.prepared.items()):
                    if now - prepared.since < self.config.recovery_after:
                        continue
                    if (gid, txid) in self._resolving:
                        continue
                    self._resolving.add((gid, txid))
                    asyncio.get_running_loop().create_task(
                        self._settle(gid, txid, prepared.coordinator_shard)
                    )

    async def _settle(self, gid: int, txid: int, coordinator_shard: int) -> None:
        try:
            # Ask for abort; the coordinator shard returns whatever was recorded first.
            decision = await self.router.call(coordinator_shard, DECIDE, [coordinator_shard, txid, False])
            fut = self._propose(gid, CMD_FINISH, [txid, bool(decision)], lambda r: r)
            await asyncio.wait_for(fut, 5.0)
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
            "address": self.config.listen,
            "pid": os.getpid(),
            "groups": {str(g): s for g, s in host.status().items()},
        }

    def shard_map(self) -> dict:
        host = self.host
        assert host is not None
        leaders = []
        for shard in range(self.config.partitions):
            leaders.append(host.leader_of(shard))
        return {
            "version": self.shard_map_version,
            "partitions": self.config.partitions,
            "vnodes": self.config.vnodes,
            "replicas": self.config.replicas,
            "nodes": {str(k): v for k, v in self.config.peers.items()},
            "shards": [list(self.ring.replicas(p)) for p in range(self.config.partitions)],
            "leaders": leaders,
        }


async def serve_forever(config: NodeConfig) -> None:
    """Run a node until SIGTERM or SIGINT."""
    node = Node(config)
    await node.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await node.stop()


__all__ = ["Node", "NodeConfig", "serve_forever", "Timeout"]
