"""Asyncio (uvloop) transport: a multiplexing client Connection, a server, and a PeerPool.

One TCP connection carries many requests at once: each request frame has a fresh
request id and its response carries the same id, so replies may come back in any order
(see :mod:`pykv.net.framing`). Frames written in one event-loop iteration go out in one
``write`` call, so a pipelined burst costs few system calls.

Failure containment: a peer that sends a malformed, oversized or truncated frame, or a
wrong handshake, gets an ERROR frame saying why and its connection is closed; the error
is logged as ``key=value`` fields on the ``pykv.net`` logger. Nothing else is affected.

This layer knows nothing of replicas or Raft: a server is ``handler(kind, body) ->
awaitable reply body``; an exception from pykv.errors raised by the handler reaches the
client as the same exception type.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pykv import errors
from pykv.errors import ProtocolError, Timeout, Unavailable
from pykv.net.framing import (
    DEFAULT_COMPRESS_THRESHOLD,
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

Handler = Callable[[int, Any], Awaitable[Any]]

# A server stops reading from a connection with this many requests unanswered.
DEFAULT_MAX_IN_FLIGHT = 4096


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop event loop where uvloop is installed (not on Windows), else asyncio's.

    Use as ``asyncio.Runner(loop_factory=new_event_loop)`` or ``asyncio.run(...,
    loop_factory=new_event_loop)`` (3.12+); everything here also runs on plain asyncio.
    """
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def log_event(level: int, event: str, **fields: Any) -> None:
    """Log one structured event: ``event=name key=value ...`` (also on the record as
    ``record.event`` and ``record.fields`` for handlers that want the structure)."""
    if not log.isEnabledFor(level):
        return
    text = " ".join(f"{k}={_field(v)}" for k, v in fields.items())
    log.log(level, "event=%s %s", event, text, extra={"event": event, "fields": fields})


def _field(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' ="'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def parse_address(address: str) -> tuple[str, int]:
    """'host:port' -> (host, port); ':port' means 127.0.0.1. Raises InvalidArgument."""
    host, sep, port = address.rpartition(":")
    if not (sep and port.isdigit() and 0 < int(port) < 65536):
        raise errors.InvalidArgument(f"address {address!r} is not 'host:port'")
    return host.strip("[]") or "127.0.0.1", int(port)


def _error_body(exc: BaseException) -> dict[str, str]:
    return {"type": type(exc).__name__, "message": str(exc)}


def _error_from(body: Any, peer: str) -> errors.Error:
    """The exception a remote ERROR body stands for (a pykv.errors type when it is one)."""
    if not isinstance(body, dict):
        return ProtocolError(f"malformed ERROR frame from {peer}: {body!r:.80}")
    name, message = str(body.get("type")), str(body.get("message"))
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, errors.Error):
        return cls(message)
    return errors.Error(f"remote {name} from {peer}: {message}")


class _FramedProtocol(asyncio.Protocol):
    """What both ends share: decoding, the handshake, coalesced writes, closing on errors."""

    def __init__(self, max_frame: int, compress_threshold: int) -> None:
        self.max_frame = max_frame
        self.compress_threshold = compress_threshold
        self.decoder = FrameDecoder(max_frame)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.handshaken = False
        self.closed = False
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._loop = asyncio.get_running_loop()

    # --- asyncio callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment] (uvloop's is not a subclass)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            frames = self.decoder.feed(data)
            for frame in frames:
                if self.closed:
                    return
                if not self.handshaken:
                    self._handshake(frame)
                else:
                    self.frame_received(frame)
            if self.decoder.error is not None:  # after the whole frames that preceded it
                raise self.decoder.error
        except ProtocolError as exc:
            self.fail(exc)

    def eof_received(self) -> bool:
        try:
            self.decoder.check_eof()
        except ProtocolError as exc:
            self.fail(exc)
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake_drain_waiters()
        self.lost(exc)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain_waiters()

    # --- writing ----------------------------------------------------------------------

    def write_raw(self, data: bytes) -> None:
        """Queue bytes; everything queued in one loop iteration goes out in one write."""
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def send_frame(self, kind: int, body: Any, request_id: int) -> None:
        self.write_raw(
            encode_frame(
                kind,
                body,
                request_id=request_id,
                max_frame=self.max_frame,
                compress_threshold=self.compress_threshold,
            )
        )

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self._out))
        self._out.clear()

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above its high-water mark."""
        if self._write_paused and not self.closed:
            waiter = self._loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def _wake_drain_waiters(self) -> None:
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    # --- errors and closing ------------------------------------------------------------

    def fail(self, exc: ProtocolError) -> None:
        """The peer broke the protocol: tell it why, log it, close this connection only."""
        if self.closed:
            return
        log_event(logging.WARNING, "protocol_error", side=self.side, peer=self.peer, error=exc)
        self.write_raw(encode_frame(ERROR, _error_body(exc)))
        self._flush()
        self.close(exc)

    def close(self, exc: BaseException | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        self._flush()
        self.failed(exc)
        if self.transport is not None:
            self.transport.close()  # sends what is buffered, then closes

    def _handshake(self, frame: Frame) -> None:
        if frame.kind == ERROR:  # the peer refused our HELLO, and says why
            self.close(_error_as_protocol_error(_error_from(frame.body, self.peer)))
            return
        check_hello(frame)
        self.handshaken = True
        self.handshake_done()

    # --- for subclasses ----------------------------------------------------------------

    side = "?"

    def handshake_done(self) -> None:
        pass

    def frame_received(self, frame: Frame) -> None:
        raise NotImplementedError

    def failed(self, exc: BaseException | None) -> None:
        """This end closed the connection (exc: why, or None for a clean close)."""

    def lost(self, exc: Exception | None) -> None:
        """The connection is gone, whoever closed it."""


def _error_as_protocol_error(exc: errors.Error) -> ProtocolError:
    return exc if isinstance(exc, ProtocolError) else ProtocolError(str(exc))


# --- server ----------------------------------------------------------------------------------


class _ServerProtocol(_FramedProtocol):
    side = "server"

    def __init__(self, server: Server) -> None:
        super().__init__(server.max_frame, server.compress_threshold)
        self.server = server
        self.tasks: set[asyncio.Task[None]] = set()
        self._reading_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.server.connections.add(self)
        log_event(logging.DEBUG, "connection_opened", side=self.side, peer=self.peer)

    def handshake_done(self) -> None:
        # The server answers HELLO only after checking the client's, so a client with
        # another protocol version hears ERROR instead and fails to open.
        self.write_raw(hello_frame())

    def pause_writing(self) -> None:
        # The client is not reading its replies: stop reading its requests (backpressure).
        super().pause_writing()
        self._update_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._update_reading()

    def _update_reading(self) -> None:
        if self.transport is None or self.closed:
            return
        should_pause = self._write_paused or len(self.tasks) >= self.server.max_in_flight
        if should_pause != self._reading_paused:
            self._reading_paused = should_pause
            if should_pause:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def frame_received(self, frame: Frame) -> None:
        if frame.kind < FIRST_APP_KIND:
            raise ProtocolError(f"a client may not send frames of protocol kind {frame.kind}")
        task = self._loop.create_task(self._answer(frame))
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        if len(self.tasks) >= self.server.max_in_flight:
            self._update_reading()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if self._reading_paused:
            self._update_reading()

    async def _answer(self, frame: Frame) -> None:
        try:
            reply = await self.server.handler(frame.kind, frame.body)
        except errors.Error as exc:
            self._reply_error(frame, exc)
        except Exception as exc:  # a bug in the handler: log it loudly, keep serving
            log.exception(
                "event=handler_error side=server peer=%s kind=%d error=%s",
                self.peer,
                frame.kind,
                _field(exc),
            )
            self._reply_error(frame, exc)
        else:
            if frame.request_id and not self.closed:
                try:
                    self.send_frame(RESPONSE, reply, frame.request_id)
                except ProtocolError as exc:  # an unencodable or oversized reply
                    self._reply_error(frame, exc)

    def _reply_error(self, frame: Frame, exc: BaseException) -> None:
        if frame.request_id and not self.closed:
            self.send_frame(ERROR, _error_body(exc), frame.request_id)

    def lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        for task in self.tasks:
            task.cancel()
        log_event(logging.DEBUG, "connection_closed", side=self.side, peer=self.peer)


class Server:
    """A listening server; create it with :func:`serve`."""

    def __init__(
        self, handler: Handler, max_frame: int, compress_threshold: int, max_in_flight: int
    ) -> None:
        self.handler = handler
        self.max_frame = max_frame
        self.compress_threshold = compress_threshold
        self.max_in_flight = max_in_flight
        self.connections: set[_ServerProtocol] = set()
        self._server: asyncio.AbstractServer | None = None
        self.host = ""
        self.port = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def close(self) -> None:
        """Stop listening and close every connection (their pending requests fail)."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close()
            for task in conn.tasks:
                task.cancel()
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def serve(
    handler: Handler,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    max_frame: int = DEFAULT_MAX_FRAME,
    compress_threshold: int = DEFAULT_COMPRESS_THRESHOLD,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
) -> Server:
    """Listen on host:port (port 0 = an ephemeral port; see ``server.port``)."""
    server = Server(handler, max_frame, compress_threshold, max_in_flight)
    loop = asyncio.get_running_loop()
    server._server = await loop.create_server(lambda: _ServerProtocol(server), host, port)
    sockname = server._server.sockets[0].getsockname()
    server.host, server.port = sockname[0], sockname[1]
    log_event(logging.INFO, "listening", address=server.address)
    return server


# --- client ----------------------------------------------------------------------------------


class _ClientProtocol(_FramedProtocol):
    side = "client"

    def __init__(self, max_frame: int, compress_threshold: int) -> None:
        super().__init__(max_frame, compress_threshold)
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.ready: asyncio.Future[None] = self._loop.create_future()
        self.error: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.write_raw(hello_frame())

    def handshake_done(self) -> None:
        if not self.ready.done():
            self.ready.set_result(None)

    def frame_received(self, frame: Frame) -> None:
        if frame.kind == RESPONSE or (frame.kind == ERROR and frame.request_id):
            future = self.pending.pop(frame.request_id, None)
            if future is None or future.done():
                return  # its request timed out or was cancelled: the reply is moot
            if frame.kind == RESPONSE:
                future.set_result(frame.body)
            else:
                future.set_exception(_error_from(frame.body, self.peer))
        elif frame.kind == ERROR:  # the server is closing this connection, and says why
            self.close(_error_as_protocol_error(_error_from(frame.body, self.peer)))
        else:
            raise ProtocolError(f"unexpected frame kind {frame.kind} from server")

    def failed(self, exc: BaseException | None) -> None:
        self.error = self.error or exc

    def lost(self, exc: Exception | None) -> None:
        error = self.error or Unavailable(
            f"connection to {self.peer} lost" + (f": {exc}" if exc else "")
        )
        self.error = error
        if not self.ready.done():
            self.ready.set_exception(error)
            self.ready.exception()  # retrieved here; open() re-raises it
        for future in self.pending.values():
            if not future.done():
                future.set_exception(error)
        self.pending.clear()


class Connection:
    """A client connection that multiplexes many concurrent requests by request id."""

    def __init__(self, protocol: _ClientProtocol, address: str) -> None:
        self._protocol = protocol
        self.address = address
        self._ids = itertools.count(1)
        self._loop = asyncio.get_running_loop()

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        *,
        timeout: float = 5.0,
        max_frame: int = DEFAULT_MAX_FRAME,
        compress_threshold: int = DEFAULT_COMPRESS_THRESHOLD,
    ) -> Connection:
        """Connect and complete the handshake; raises Unavailable, Timeout or ProtocolError."""
        loop = asyncio.get_running_loop()
        address = f"{host}:{port}"
        try:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _ClientProtocol(max_frame, compress_threshold), host, port
                ),
                timeout,
            )
        except asyncio.TimeoutError:
            raise Timeout(f"connecting to {address} took over {timeout}s") from None
        except OSError as exc:
            raise Unavailable(f"cannot connect to {address}: {exc}") from exc
        try:
            await asyncio.wait_for(asyncio.shield(protocol.ready), timeout)
        except asyncio.TimeoutError:
            protocol.close()
            raise Timeout(f"no handshake from {address} within {timeout}s") from None
        return cls(protocol, address)

    @property
    def closed(self) -> bool:
        return self._protocol.closed

    @property
    def in_flight(self) -> int:
        return len(self._protocol.pending)

    async def request(self, kind: int, body: Any, timeout: float | None = None) -> Any:
        """Send a request and wait for its reply body.

        Raises the server's pykv error, Timeout (the outcome is then unknown),
        Unavailable if the connection is or gets closed, ProtocolError on a bad frame.
        """
        protocol = self._protocol
        if protocol.closed:
            raise protocol.error or Unavailable(f"connection to {self.address} is closed")
        if kind < FIRST_APP_KIND:
            raise ProtocolError(f"request kinds start at {FIRST_APP_KIND}, got {kind}")
        request_id = next(self._ids)
        future = self._loop.create_future()
        protocol.send_frame(kind, body, request_id)
        protocol.pending[request_id] = future
        timer = None
        if timeout is not None:
            timer = self._loop.call_later(timeout, self._expire, request_id, kind, timeout)
        try:
            await protocol.drain()
            return await future
        finally:
            if timer is not None:
                timer.cancel()
            protocol.pending.pop(request_id, None)

    def _expire(self, request_id: int, kind: int, timeout: float) -> None:
        future = self._protocol.pending.pop(request_id, None)
        if future is not None and not future.done():
            future.set_exception(
                Timeout(
                    f"no reply from {self.address} to request {request_id} (kind {kind}) "
                    f"within {timeout}s; its outcome is unknown"
                )
            )

    async def send(self, kind: int, body: Any) -> None:
        """Send a one-way message (no reply); waits only if the write buffer is full."""
        protocol = self._protocol
        if protocol.closed:
            raise protocol.error or Unavailable(f"connection to {self.address} is closed")
        if kind < FIRST_APP_KIND:
            raise ProtocolError(f"message kinds start at {FIRST_APP_KIND}, got {kind}")
        protocol.send_frame(kind, body, 0)
        await protocol.drain()

    def close(self) -> None:
        self._protocol.close()

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


# --- peer pool -------------------------------------------------------------------------------


class PeerPool:
    """One connection per peer address, reconnected on demand with exponential backoff.

    After a failed connect the address is not tried again until the backoff (doubling
    from ``backoff_initial`` to ``backoff_max``, with jitter) has passed; meanwhile
    requests to it fail fast with Unavailable. A success resets the backoff.
    """

    def __init__(
        self,
        *,
        connect_timeout: float = 2.0,
        backoff_initial: float = 0.05,
        backoff_max: float = 5.0,
        max_frame: int = DEFAULT_MAX_FRAME,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.max_frame = max_frame
        self._rng = rng or random.Random()
        self._clock = clock
        self._connections: dict[str, Connection] = {}
        self._connecting: dict[str, asyncio.Future[Connection]] = {}
        self._failures: dict[str, int] = {}
        self._retry_at: dict[str, float] = {}
        self._last_error: dict[str, BaseException] = {}
        self._closed = False

    async def get(self, address: str) -> Connection:
        """The live connection to address, connecting (once, however many callers) if needed."""
        if self._closed:
            raise Unavailable("the peer pool is closed")
        conn = self._connections.get(address)
        if conn is not None and not conn.closed:
            return conn
        pending = self._connecting.get(address)
        if pending is not None:
            return await asyncio.shield(pending)
        wait = self._retry_at.get(address, 0.0) - self._clock()
        if wait > 0:
            raise Unavailable(
                f"{address} is unreachable ({self._failures[address]} failed attempts, last: "
                f"{self._last_error[address]}); next attempt in {wait:.3f}s"
            )
        future = asyncio.get_running_loop().create_future()
        self._connecting[address] = future
        try:
            host, port = parse_address(address)
            conn = await Connection.open(
                host, port, timeout=self.connect_timeout, max_frame=self.max_frame
            )
        except (errors.Error, ValueError) as exc:
            self._note_failure(address, exc)
            future.set_exception(exc)
            future.exception()  # mark retrieved: other waiters re-raise it themselves
            raise
        finally:
            del self._connecting[address]
        self._failures.pop(address, None)
        self._retry_at.pop(address, None)
        self._connections[address] = conn
        future.set_result(conn)
        return conn

    def _note_failure(self, address: str, exc: BaseException) -> None:
        failures = self._failures.get(address, 0) + 1
        self._failures[address] = failures
        self._last_error[address] = exc
        backoff = min(self.backoff_max, self.backoff_initial * 2 ** (failures - 1))
        self._retry_at[address] = self._clock() + backoff * self._rng.uniform(0.5, 1.0)
        log_event(
            logging.INFO,
            "peer_unreachable",
            peer=address,
            failures=failures,
            retry_in=f"{backoff:.3f}",
            error=exc,
        )

    async def request(
        self, address: str, kind: int, body: Any, timeout: float | None = None
    ) -> Any:
        return await (await self.get(address)).request(kind, body, timeout)

    async def send(self, address: str, kind: int, body: Any) -> None:
        await (await self.get(address)).send(kind, body)

    async def close(self) -> None:
        self._closed = True
        for conn in self._connections.values():
            conn.close()
        self._connections.clear()
