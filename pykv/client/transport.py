"""A pipelined asyncio connection to a node over pykv.net.framing, and the RPC kinds nodes speak.

A ``Connection`` carries many requests at once: each request gets an id and its response
comes back with that id, in any order. Request id 0 is a one-way message (no response),
which is how nodes ship Raft message batches to each other.

Replies (the body of a RESPONSE frame) are tagged lists:
``[OK, result]``, ``[REDIRECT, leader_hint]`` (this node does not lead the shard; the hint
is a node id or None), ``[FAILED, error_class_name, message]`` (a pykv error to raise).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
from typing import Any

from pykv import errors
from pykv.errors import ProtocolError, Timeout, Unavailable
from pykv.net.framing import (
    DEFAULT_MAX_FRAME,
    HELLO,
    RESPONSE,
    FrameDecoder,
    check_hello,
    encode_frame,
    hello_frame,
)
from pykv.net.protocol import parse_address

log = logging.getLogger("pykv.client")

# Application frame kinds (pykv.net.framing reserves 0-15).
RAFT = 16  # one-way: a batch of Raft messages for many groups, from one node to another
STATUS = 17  # node and group status (pykv status, cluster up)
SHARD_MAP = 18  # the shard map: ring parameters, replica sets, addresses, leader hints
READ = 19  # [shard, [keys], optimistic?] -> [version wire per key]  (linearizable, on the
# leader; optimistic: answered from the leader's state without a leadership round)
COMMIT = 20  # [shard, request wire] -> outcome  (a single-shard transaction)
PREPARE = 21  # [shard, request wire, coordinator shard, participants] -> vote outcome
DECIDE = 22  # [shard, txid, commit?, participants] -> the recorded decision (bool)
FINISH = 23  # [shard, txid, commit?] -> outcome
SCAN = 24  # [shard, prefix, start, end, limit] -> [[key, version wire]...]
RESOLVER = 25  # [shard, prefix, builtin name] -> outcome
COMMIT_DECIDE = 26  # [shard, request wire, other shards?] -> outcome: the coordinator's part +
# decision; with the other participants' shards, the leader then sends them FINISH
JOIN = 27  # [META_GROUP, node id, address] -> map version: add a node to the shard map
MEMBERS = 28  # [shard] -> {leader, voters, learners, commit, match} from the shard's leader
CONF = 29  # [shard, step, node] -> None: add_learner / promote / remove / transfer
HOST = 30  # [shard] -> None: start hosting an empty replica (a learner-to-be)
DROP = 31  # [shard] -> None: stop hosting a replica this node was removed from
WIPE = 32  # [shard] -> outcome: forget every key, resolver and outcome of the shard
LEAVE = 33  # [META_GROUP, node id] -> map version: take a node out of the shard map

META_GROUP = 1 << 20  # the Raft group id of the metadata group (shard groups are 0..Q-1)

OK, REDIRECT, FAILED = 0, 1, 2


class Redirect(Exception):
    """The node does not lead the shard; ``leader`` is its hint (a node id or None)."""

    def __init__(self, leader: int | None) -> None:
        super().__init__(f"not the leader; hint: {leader}")
        self.leader = leader


def error_from_reply(name: str, message: str) -> errors.Error:
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.Error)):
        cls = errors.Error
    return cls(message)


def unwrap(reply: Any) -> Any:
    """The result of a tagged reply; raises Redirect or the pykv error it names."""
    if not isinstance(reply, list) or not reply:
        raise ProtocolError(f"malformed reply {reply!r:.80}")
    tag = reply[0]
    if tag == OK:
        return reply[1]
    if tag == REDIRECT:
        raise Redirect(reply[1])
    if tag == FAILED:
        raise error_from_reply(reply[1], reply[2])
    raise ProtocolError(f"unknown reply tag {tag!r}")


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """Send small frames at once: Nagle's algorithm plus delayed ACKs would add ~40 ms."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class CoalescingWriter:
    """Frames written in one turn of the event loop leave in one write() system call.

    Many requests (or responses) produced together, by many client threads or by one
    driver-loop iteration, would otherwise cost a system call and a wake-up of the peer
    each; on a busy machine that, not the bytes, is what limits throughput.
    """

    __slots__ = ("_transport", "_pending", "_loop")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def write(self, frame: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(frame)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending and not self._transport.is_closing():
            self._transport.write(b"".join(pending))


class Connection(asyncio.Protocol):
    """One client side of a pipelined connection (create with ``await Connection.open``)."""

    def __init__(self, address: str, max_frame: int) -> None:
        self.address = address
        self._decoder = FrameDecoder(max_frame)
        self._max_frame = max_frame
        self._transport: asyncio.Transport | None = None
        self._writer: CoalescingWriter | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._greeted: asyncio.Future = asyncio.get_running_loop().create_future()
        self.closed = False

    @classmethod
    async def open(
        cls, address: str, *, timeout: float = 5.0, max_frame: int = DEFAULT_MAX_FRAME
    ) -> Connection:
        """Connect and exchange HELLO; raises Unavailable when the node cannot be reached."""
        host, port = parse_address(address)
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: cls(address, max_frame), host, port), timeout
            )
            await asyncio.wait_for(asyncio.shield(conn._greeted), timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise Unavailable(f"cannot connect to {address}: {exc or type(exc).__name__}") from None
        return conn

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._writer = CoalescingWriter(transport)  # type: ignore[arg-type]
        set_nodelay(transport)
        transport.write(hello_frame())  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except ProtocolError as exc:
            log.error("closing connection to %s: %s", self.address, exc)
            self._abort(exc)
            return
        for frame in frames:
            if not self._greeted.done():
                try:
                    check_hello(frame)
                except ProtocolError as exc:
                    log.error("closing connection to %s: %s", self.address, exc)
                    self._greeted.set_exception(exc)
                    self._abort(exc)
                    return
                self._greeted.set_result(None)
                continue
            if frame.kind == HELLO:
                continue
            fut = self._waiting.pop(frame.request_id, None)
            if fut is not None and not fut.done():
                fut.set_result(frame.body)
        if self._decoder.error is not None:
            log.error("closing connection to %s: %s", self.address, self._decoder.error)
            self._abort(self._decoder.error)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        failure = Unavailable(f"connection to {self.address} lost")
        if not self._greeted.done():
            self._greeted.set_exception(failure)
        waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(failure)

    def _abort(self, exc: Exception) -> None:
        if self._transport is not None:
            self._transport.abort()

    # --- requests -----------------------------------------------------------------------------

    def request_future(self, kind: int, body: Any) -> asyncio.Future:
        """Send a request and return the future of its raw reply body."""
        if self.closed or self._writer is None:
            raise Unavailable(f"connection to {self.address} is closed")
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        self._writer.write(encode_frame(kind, body, request_id=rid, max_frame=self._max_frame))
        return fut

    async def request(self, kind: int, body: Any, timeout: float) -> Any:
        """Send a request and wait for its reply body; raises Timeout or Unavailable."""
        fut = self.request_future(kind, body)
        # A timer on the reply future, not asyncio.wait_for: that wraps every request in a
        # task of its own, which costs the client more CPU than the request.
        timer = asyncio.get_running_loop().call_later(timeout, self._expire, fut, timeout)
        try:
            return await fut
        finally:
            timer.cancel()

    def _expire(self, fut: asyncio.Future, timeout: float) -> None:
        if not fut.done():
            fut.set_exception(Timeout(
                f"no reply from {self.address} within {timeout:.3g}s; the outcome is unknown"
            ))

    def send(self, kind: int, body: Any) -> None:
        """Send a one-way message (no reply); dropped silently when the connection is down."""
        if self.closed or self._writer is None:
            return
        self._writer.write(encode_frame(kind, body, max_frame=self._max_frame))

    def close(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.close()
        self.closed = True


__all__ = [
    "COMMIT", "COMMIT_DECIDE", "CONF", "CoalescingWriter", "Connection", "DROP", "HOST", "JOIN",
    "LEAVE", "MEMBERS", "META_GROUP", "WIPE", "DECIDE", "FAILED", "FINISH", "OK", "PREPARE", "RAFT", "READ",
    "REDIRECT", "RESOLVER", "RESPONSE", "Redirect", "SCAN", "SHARD_MAP", "STATUS",
    "error_from_reply", "unwrap",
]
