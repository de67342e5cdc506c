"""The one framed, pipelined, handshaked asyncio connection that clients and nodes share."""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
from typing import Any

from pykv import errors
from pykv.errors import NotAnswering, ProtocolError, Timeout, Unavailable, WrongCluster
from pykv.net.framing import (
    DEFAULT_MAX_FRAME,
    ERROR,
    FIRST_APP_KIND,
    RESPONSE,
    Frame,
    FrameDecoder,
    check_hello,
    encode_frame,
    hello_frame,
)

log = logging.getLogger("pykv.net")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop event loop where uvloop is installed (not on Windows), else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def parse_address(address: str) -> tuple[str, int]:
    """'host:port' -> (host, port); ':port' means 127.0.0.1. Raises InvalidArgument."""
    host, sep, port = address.rpartition(":")
    if not (sep and port.isdigit() and 0 < int(port) < 65536):
        raise errors.InvalidArgument(f"address {address!r} is not 'host:port'")
    return host.strip("[]") or "127.0.0.1", int(port)


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """Send small frames at once: Nagle's algorithm plus delayed ACKs would add ~40 ms."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def error_body(exc: BaseException) -> dict[str, str]:
    """The body of an ERROR frame that reports exc."""
    return {"type": type(exc).__name__, "message": str(exc)}


def error_from(body: Any, peer: str) -> errors.Error:
    """The exception an ERROR frame's body stands for (a pykv.errors type when it names one)."""
    if not isinstance(body, dict):
        return ProtocolError(f"malformed ERROR frame from {peer}: {body!r:.80}")
    name, message = str(body.get("type")), str(body.get("message"))
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, errors.Error):
        return cls(message)
    return errors.Error(f"remote {name} from {peer}: {message}")


def as_protocol_error(exc: errors.Error) -> ProtocolError:
    """exc as the ProtocolError that closed a connection."""
    return exc if isinstance(exc, ProtocolError) else ProtocolError(str(exc))


class FramedProtocol(asyncio.Protocol):
    """One end of a connection: each side sends HELLO at once and checks the other's, then
    frames flow both ways, any number in flight (see pykv.net.framing for the format).

    Frames written in one turn of the event loop leave in one ``write`` (one system call and
    one wake-up of the peer for a whole burst). A peer that breaks the protocol (a malformed,
    oversized or truncated frame, a wrong HELLO) is told why in an ERROR frame, the error is
    logged on ``pykv.net``, and this connection alone is closed.
    """

    side = "?"  # "client" or "server": says which way a logged connection went
    # The connecting end sends its HELLO at once, naming its cluster if it knows it. The
    # accepting end answers with its own only once the peer's passed (a peer of another
    # cluster gets an ERROR frame instead, first), and never names its cluster, so clients of
    # releases before cluster ids, which read a 2-item HELLO only, still talk to it.
    hello_at_once = True

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, cluster: str | None = None) -> None:
        self.max_frame = max_frame
        # This side's cluster id, sent in its HELLO (None: not known, as a new client); the
        # peer's, from its HELLO. Two different ones end the connection at the handshake.
        self.cluster = cluster
        self.peer_cluster: str | None = None
        self.peer = "?"
        self.greeted = False
        self.closed = False
        self._decoder = FrameDecoder(max_frame)
        self.transport: asyncio.Transport | None = None
        self._out: list[bytes] = []
        self._loop = asyncio.get_running_loop()
        self._writable: asyncio.Future[None] | None = None  # set while the transport is full

    # --- asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment] (uvloop's is not a subclass)
        set_nodelay(transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        if self.hello_at_once:
            transport.write(hello_frame(cluster=self.cluster))  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        greeted = self.greeted
        try:
            frames = self._decoder.feed(data)
            if not greeted:
                frames = self._greet(frames)
            if frames:
                self.frames_received(frames)
            if self._decoder.error is not None:  # after the whole frames that preceded it
                raise self._decoder.error
        except ProtocolError as exc:
            if not greeted and not isinstance(exc, WrongCluster):
                # Most likely something else listens there (an HTTP server, a port scanner):
                # say so, with what it sent, rather than only what the decoder made of it.
                exc = ProtocolError(f"the peer does not speak the pykv protocol (it sent"
                                    f" {bytes(data[:40])!r}): {exc}")
            self.fail(exc)

    def eof_received(self) -> bool:
        try:
            self._decoder.check_eof()
        except ProtocolError as exc:
            log.error("connection %s ended badly: %s", self._described(), exc)
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed and self._decoder.buffered and self._decoder.error is None:
            # Reset (not closed) in the middle of a frame: the same as a truncated stream.
            log.error("connection %s ended badly: reset inside a frame (%d bytes)",
                      self._described(), self._decoder.buffered)
        self.closed = True
        self.resume_writing()  # a writer waiting in drain() sees the connection closed
        self.lost(exc)

    # --- writing ----------------------------------------------------------------------------

    def write(self, frame: bytes) -> None:
        """Queue one encoded frame; it leaves with every other one queued in this loop turn."""
        out = self._out
        if not out:
            self._loop.call_soon(self.flush)
        out.append(frame)

    def flush(self) -> None:
        """Hand what is queued to the transport now, not at the end of this loop turn (for
        a caller about to block the loop)."""
        out, self._out = self._out, []
        transport = self.transport
        if out and transport is not None and not transport.is_closing():
            transport.write(b"".join(out))  # a single frame is not copied by join

    async def drain(self) -> None:
        """Send what is queued and wait while the transport's buffer is full: a writer of
        many large frames (a snapshot) waits here instead of buffering all of them."""
        self.flush()
        if self._writable is not None and not self.closed:
            await asyncio.shield(self._writable)

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    # --- errors and closing ------------------------------------------------------------------

    def fail(self, exc: ProtocolError) -> None:
        """The peer broke the protocol: log it, tell the peer why, close this connection only."""
        if self.closed:
            return
        log.error("closing connection %s: %s", self._described(), exc)
        self.write(encode_frame(ERROR, error_body(exc)))
        self.close(exc)

    def close(self, exc: BaseException | None = None) -> None:
        """Close after sending what is queued (exc: why, or None for a clean close)."""
        if self.closed:
            return
        self.flush()
        self.closed = True
        self.closing(exc)
        if self.transport is not None:
            self.transport.close()

    def _greet(self, frames: list[Frame]) -> list[Frame]:
        """Check the peer's HELLO, the first frame; the frames after it."""
        if not frames:
            return frames
        first = frames[0]
        if first.kind == ERROR:  # the peer refused this end's HELLO, and says why
            error = as_protocol_error(error_from(first.body, self.peer))
            log.error("connection %s refused by the peer: %s", self._described(), error)
            self.close(error)
            return []
        self.peer_cluster = check_hello(first, cluster=self.cluster)
        if not self.hello_at_once:
            self.write(hello_frame())  # before any reply: the first frame queued
        self.greeted = True
        self.handshake_done()
        return frames[1:]

    def _described(self) -> str:
        return f"{'from' if self.side == 'server' else 'to'} {self.peer}"

    # --- for subclasses ----------------------------------------------------------------------

    def frames_received(self, frames: list[Frame]) -> None:
        """Frames after the handshake, in order; raise ProtocolError to drop the peer."""
        raise NotImplementedError

    def handshake_done(self) -> None:
        """The peer's HELLO was right."""

    def closing(self, exc: BaseException | None) -> None:
        """This end is closing the connection (exc: why, or None for a clean close)."""

    def lost(self, exc: Exception | None) -> None:
        """The connection is gone, whoever closed it."""


class ServerProtocol(FramedProtocol):
    """The accepting end: requests go to ``request_received``, replies come back through
    ``respond``, at once or later and in any order. Subclass it and pass a factory of it to
    ``loop.create_server``."""

    side = "server"
    hello_at_once = False

    # Flow control: a server writes only replies, so a client that does not read them gets
    # no more of its requests read until it does; nor does one that has max_in_flight
    # requests unanswered (each holds memory until it is answered: a proposal, a read)
    # until half of them are. (Not on the client side: two ends that both stop reading
    # while their writes are blocked would wait for each other forever.)

    max_in_flight = 4096
    reading_paused = False
    _writes_blocked = False
    _in_flight = 0

    def pause_writing(self) -> None:
        super().pause_writing()
        self._writes_blocked = True
        self._update_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._writes_blocked = False
        self._update_reading()

    def _update_reading(self) -> None:
        if self.closed or self.transport is None:
            return
        if self.reading_paused:
            pause = self._writes_blocked or self._in_flight > self.max_in_flight // 2
        else:
            pause = self._writes_blocked or self._in_flight >= self.max_in_flight
        if pause != self.reading_paused:
            self.reading_paused = pause
            if pause:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def frames_received(self, frames: list[Frame]) -> None:
        handle = self.request_received
        for frame in frames:
            if frame.kind < FIRST_APP_KIND:
                raise ProtocolError(f"a client may not send frames of protocol kind {frame.kind}")
            if frame.request_id:
                self._in_flight += 1
            handle(frame.kind, frame.request_id, frame.body)
        if self._in_flight >= self.max_in_flight:
            self._update_reading()

    def request_received(self, kind: int, request_id: int, body: Any) -> None:
        """One request (request_id 0: a one-way message, nobody waits for a reply)."""
        raise NotImplementedError

    def respond(self, request_id: int, reply: Any) -> None:
        """Send the reply to a request (nothing for a one-way message or a closed connection)."""
        if request_id == 0 or self.closed:
            return
        self._in_flight -= 1
        if self.reading_paused and not self._writes_blocked:
            self._update_reading()
        try:
            frame = encode_frame(RESPONSE, reply, request_id=request_id, max_frame=self.max_frame)
        except ProtocolError as exc:  # an unencodable or oversized reply
            frame = self.refusal(request_id, exc)
        self.write(frame)

    def refusal(self, request_id: int, exc: ProtocolError) -> bytes:
        """The frame that answers a request whose reply cannot be sent."""
        return encode_frame(ERROR, error_body(exc), request_id=request_id)


class Connection(FramedProtocol):
    """The connecting end, which multiplexes many requests by request id: replies come back
    in any order. Create it with ``await Connection.open(address)``."""

    side = "client"

    def __init__(self, address: str, max_frame: int = DEFAULT_MAX_FRAME, cluster: str | None = None) -> None:
        super().__init__(max_frame, cluster)
        self.address = address
        self.error: BaseException | None = None  # why the connection closed
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._greeting: asyncio.Future[None] = self._loop.create_future()
        self.heard = 0.0  # loop time of the last frame from the peer
        self._probing = False  # a probe (request(..., probe=KIND)) is waiting for its reply

    @classmethod
    async def open(
        cls, address: str, *, timeout: float = 5.0, max_frame: int = DEFAULT_MAX_FRAME,
        cluster: str | None = None,
    ) -> Connection:
        """Connect and exchange HELLO (``cluster``: this side's cluster id, if known). Raises
        Unavailable when the peer cannot be reached in time, ProtocolError when it refuses the
        handshake (another protocol version), WrongCluster when it belongs to another cluster."""
        host, port = parse_address(address)
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: cls(address, max_frame, cluster), host, port), timeout
            )
        except (OSError, asyncio.TimeoutError) as exc:
            raise Unavailable(f"cannot connect to {address}: {exc or type(exc).__name__}") from None
        try:
            await asyncio.wait_for(asyncio.shield(conn._greeting), timeout)
        except asyncio.TimeoutError:
            conn.close()
            raise NotAnswering(f"cannot connect to {address}: no HELLO within {timeout}s") from None
        return conn

    @property
    def in_flight(self) -> int:
        """Requests sent and not answered yet."""
        return len(self._waiting)

    # --- requests -----------------------------------------------------------------------------

    def _send_request(self, kind: int, body: Any) -> tuple[int, asyncio.Future[Any]]:
        if self.closed:
            raise Unavailable(f"connection to {self.address} is closed")
        request_id = next(self._ids)
        frame = encode_frame(kind, body, request_id=request_id, max_frame=self.max_frame)
        future = self._loop.create_future()
        self._waiting[request_id] = future
        self.write(frame)
        return request_id, future

    async def request(
        self, kind: int, body: Any, timeout: float, *, silence: float | None = None, probe: int | None = None
    ) -> Any:
        """Send a request and wait for its reply body. Raises Timeout (a command's outcome is
        then unknown: the caller, who knows the kind, says so), Unavailable if the connection
        is or gets closed, the error of an ERROR reply.

        ``silence``: raise Timeout sooner, once the peer has sent nothing at all on this
        connection for that long (a frozen or cut-off node), asking it meanwhile with a
        ``probe`` request (a kind it answers at once) whether it is there. A peer that goes
        on talking is waited for up to ``timeout``: its request is slow (it waits on locks),
        and asking another node would not make it faster."""
        request_id, future = self._send_request(kind, body)
        # A timer on the reply future, not asyncio.wait_for: that wraps every request in a
        # task of its own, which costs the client more CPU than the request.
        if silence is None or silence >= timeout:
            timer = self._loop.call_later(timeout, self._expire, request_id, timeout)
        else:
            timer = _SilenceWatch(self, request_id, timeout, silence, probe)
        try:
            return await future
        finally:
            timer.cancel()

    def _expire(self, request_id: int, timeout: float, why: str = "") -> None:
        future = self._waiting.pop(request_id, None)
        if future is not None and not future.done():
            future.set_exception(Timeout(f"no reply from {self.address} within {timeout:.3g}s{why}"))

    def _probe(self, kind: int) -> None:
        """Ask the peer for a sign of life (one probe at a time); its reply sets ``heard``."""
        if self._probing or self.closed:
            return
        self._probing = True
        _, future = self._send_request(kind, None)
        future.add_done_callback(self._probed)

    def _probed(self, future: asyncio.Future[Any]) -> None:
        self._probing = False
        if not future.cancelled():
            future.exception()  # retrieved: a probe's outcome is only that it came

    def send(self, kind: int, body: Any) -> None:
        """Send a one-way message (no reply); dropped silently when the connection is down.
        Raises ProtocolError when the message cannot be encoded or exceeds max_frame."""
        if self.closed:
            return
        self.write(encode_frame(kind, body, max_frame=self.max_frame))

    # --- frames from the server ---------------------------------------------------------------

    def frames_received(self, frames: list[Frame]) -> None:
        self.heard = self._loop.time()
        waiting = self._waiting
        for frame in frames:
            if frame.kind != RESPONSE:
                self._control(frame)
                continue
            future = waiting.pop(frame.request_id, None)
            if future is not None and not future.done():
                future.set_result(frame.body)

    def _control(self, frame: Frame) -> None:
        if frame.kind != ERROR:
            raise ProtocolError(f"unexpected frame kind {frame.kind} from {self.peer}")
        error = error_from(frame.body, self.peer)
        if frame.request_id == 0:  # the server is closing this connection, and says why
            log.error("connection %s closed by the server: %s", self._described(), error)
            self.close(as_protocol_error(error))
            return
        future = self._waiting.pop(frame.request_id, None)
        if future is not None and not future.done():
            future.set_exception(error)

    def handshake_done(self) -> None:
        if not self._greeting.done():
            self._greeting.set_result(None)

    def closing(self, exc: BaseException | None) -> None:
        self.error = self.error or exc

    def lost(self, exc: Exception | None) -> None:
        error = self.error or Unavailable(
            f"connection to {self.address} lost" + (f": {exc}" if exc else "")
        )
        self.error = error
        if not self._greeting.done():
            self._greeting.set_exception(error)
            self._greeting.exception()  # retrieved here: open() re-raises it
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(error)

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


class _SilenceWatch:
    """The timer of a request given a ``silence`` (Connection.request): every half of it, a
    check of whether the peer said anything since the last; after a half without a word, a
    probe; after a whole one, Timeout. The request's own timeout ends it in any case."""

    __slots__ = ("conn", "request_id", "timeout", "deadline", "silence", "probe", "since", "probed", "timer")

    def __init__(self, conn: Connection, request_id: int, timeout: float, silence: float, probe: int | None) -> None:
        self.conn = conn
        self.request_id = request_id
        self.timeout = timeout
        self.silence = silence
        self.probe = probe
        loop = conn._loop
        self.since = loop.time()
        self.deadline = self.since + timeout
        self.probed = False
        self.timer = loop.call_at(min(self.since + silence / 2, self.deadline), self._check)

    def _check(self) -> None:
        conn = self.conn
        now = conn._loop.time()
        if now >= self.deadline:
            conn._expire(self.request_id, self.timeout)
            return
        if conn.heard >= self.since:  # it spoke: alive; watch the next stretch
            self.since, self.probed = now, False
            follow = now + self.silence / 2
        elif not self.probed and self.probe is not None:
            conn._probe(self.probe)
            self.probed = True
            follow = self.since + self.silence
        elif now >= self.since + self.silence:
            conn._expire(self.request_id, self.silence, ", nor anything else")
            return
        else:
            follow = self.since + self.silence
        self.timer = conn._loop.call_at(min(follow, self.deadline), self._check)

    def cancel(self) -> None:
        self.timer.cancel()
