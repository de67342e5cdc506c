"""The shared framed connection over real sockets on 127.0.0.1 under uvloop."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket

import msgpack
import pytest

from pykv.errors import ProtocolError, Timeout, Unavailable
from pykv.net.framing import (
    ERROR,
    HEADER,
    HELLO,
    PROTOCOL_VERSION,
    RESPONSE,
    FrameDecoder,
    encode_frame,
    hello_frame,
)
from pykv.net.protocol import Connection, ServerProtocol, new_event_loop

ECHO, LATER, RECORD, NEVER, UNENCODABLE, FORBIDDEN = 16, 17, 18, 19, 20, 21
# The handshake frame of protocol version 1, byte for byte: what every pykv release sends.
HELLO_V1 = b"\x00\x00\x00\x0a\x00\x92\x00\x92\xc4\x04PYKV\x01"


def run(coro):
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        assert type(runner.get_loop()).__module__.startswith("uvloop")  # the loop pykv runs on
        return runner.run(coro)


class App(ServerProtocol):
    """A server with a few behaviours; its rig records one-way messages and live connections."""

    def __init__(self, rig: Rig) -> None:
        super().__init__(rig.max_frame)
        self.rig = rig

    def connection_made(self, transport):
        super().connection_made(transport)
        self.rig.connections.add(self)

    def lost(self, exc):
        self.rig.connections.discard(self)

    def request_received(self, kind, request_id, body):
        self.rig.received += 1
        if kind == ECHO:
            self.respond(request_id, body)
        elif kind == LATER:  # replies overtake one another
            self._loop.call_later(body["delay"], self.respond, request_id, body)
        elif kind == RECORD:
            self.rig.recorded.append(body)
        elif kind == UNENCODABLE:
            self.respond(request_id, object())
        elif kind == FORBIDDEN:
            raise ProtocolError("FORBIDDEN requests are not allowed")
        # NEVER: no reply at all


class Rig:
    """A listening App server on an ephemeral port."""

    def __init__(self, max_frame: int = 16 << 20, app: type[App] = App) -> None:
        self.max_frame = max_frame
        self.app = app
        self.received = 0
        self.connections: set[App] = set()
        self.recorded: list = []
        self.server: asyncio.AbstractServer | None = None
        self.address = ""

    async def __aenter__(self) -> Rig:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: self.app(self), "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.server.close()
        for conn in list(self.connections):
            conn.close()
        await self.server.wait_closed()

    async def raw_client(self):
        host, port = self.address.split(":")
        return await asyncio.open_connection(host, int(port))


async def read_frames(reader, decoder=None):
    """Everything the peer sends until it closes the connection, as frames."""
    decoder = decoder or FrameDecoder()
    frames = []
    while chunk := await asyncio.wait_for(reader.read(65536), 10):
        frames.extend(decoder.feed(chunk))
    return frames


async def until(condition) -> None:
    """Wait (bounded) until condition() holds; the test then asserts what follows from it."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")


def test_requests_and_replies_round_trip():
    async def main():
        async with Rig() as rig, await Connection.open(rig.address) as conn:
            assert await conn.request(ECHO, {"k": [1, b"2"]}, 10) == {"k": [1, b"2"]}
            assert await conn.request(ECHO, b"z" * 200_000, 10) == b"z" * 200_000  # zstd
            assert conn.in_flight == 0

    run(main())


def test_an_unencodable_reply_fails_that_request_only():
    async def main():
        async with Rig() as rig, await Connection.open(rig.address) as conn:
            with pytest.raises(ProtocolError, match="cannot be encoded"):
                await conn.request(UNENCODABLE, None, 10)
            assert await conn.request(ECHO, "good", 10) == "good"

    run(main())


def test_pipelining_1000_requests_on_one_connection_replies_in_any_order():
    async def main():
        async with Rig() as rig, await Connection.open(rig.address) as conn:
            bodies = [{"i": i, "delay": (1000 - i) / 200_000} for i in range(1000)]
            replies = await asyncio.gather(*(conn.request(LATER, b, 10) for b in bodies))
            assert replies == bodies
            assert len(rig.connections) == 1

    run(main())


def test_one_way_messages_arrive_in_order():
    async def main():
        async with Rig() as rig, await Connection.open(rig.address) as conn:
            for i in range(100):
                conn.send(RECORD, i)
            await conn.request(ECHO, "barrier", 10)
            assert rig.recorded == list(range(100))

    run(main())


def test_a_timeout_leaves_the_connection_usable():
    async def main():
        async with Rig() as rig, await Connection.open(rig.address) as conn:
            with pytest.raises(Timeout, match="no reply from"):
                await conn.request(NEVER, None, 0.05)
            assert conn.in_flight == 0
            assert await conn.request(ECHO, 1, 10) == 1

    run(main())


def test_both_ends_send_small_frames_at_once():
    async def main():
        async with Rig() as rig, await Connection.open(rig.address) as conn:
            (server_side,) = rig.connections
            for end in (conn, server_side):
                sock = end.transport.get_extra_info("socket")
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

    run(main())


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\n\r\n",  # before any handshake
        hello_frame() + HEADER.pack(5, 16) + b"\xc1\xc1\xc1\xc1\xc1",  # bad msgpack
        hello_frame() + encode_frame(RESPONSE, "not a request", request_id=1),  # wrong kind
        hello_frame() + encode_frame(FORBIDDEN, None, request_id=1),  # the server refuses it
    ],
    ids=["http", "bad-msgpack", "client-sends-response", "refused-by-the-server"],
)
def test_a_garbage_client_is_disconnected_and_a_good_one_keeps_working(garbage, caplog):
    async def main():
        async with Rig() as rig, await Connection.open(rig.address) as good:
            assert await good.request(ECHO, "before", 10) == "before"
            reader, writer = await rig.raw_client()
            writer.write(garbage)
            frames = await read_frames(reader)  # ends: the server closed on it
            writer.close()
            assert frames[-1].kind == ERROR and frames[-1].request_id == 0
            assert frames[-1].body["type"] == "ProtocolError"
            assert await good.request(ECHO, "after", 10) == "after"
            assert len(rig.connections) == 1

    with caplog.at_level(logging.ERROR, logger="pykv.net"):
        run(main())
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith("closing connection from 127.0.0.1:")


def test_a_client_of_something_that_is_not_a_pykv_node_is_told_so():
    async def main():
        async def http_server(reader, writer):
            writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            await writer.drain()

        server = await asyncio.start_server(http_server, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises((ProtocolError, Unavailable), match=r"does not speak the pykv protocol \(it sent b'HTTP/1.1 400"):
                conn = await Connection.open(f"127.0.0.1:{port}", timeout=2)
                await conn.request(ECHO, "x", 2)
        finally:
            server.close()

    run(main())


def test_an_oversized_frame_is_refused_before_it_is_buffered(caplog):
    async def main():
        async with Rig(max_frame=1024) as rig:
            reader, writer = await rig.raw_client()
            writer.write(hello_frame() + HEADER.pack(1 << 30, 16))  # claims a 1 GiB payload
            frames = await read_frames(reader)
            writer.close()
            assert [f.kind for f in frames] == [HELLO, ERROR]
            assert "frame length 1073741824 exceeds max_frame 1024" in frames[-1].body["message"]
            # A client allowed larger frames than the server learns why it was dropped.
            async with await Connection.open(rig.address) as conn:
                with pytest.raises(ProtocolError, match="exceeds max_frame 1024"):
                    await conn.request(ECHO, os.urandom(5000), 10)
                assert conn.closed
            # A client with the same limit refuses to send it, and stays usable.
            async with await Connection.open(rig.address, max_frame=1024) as conn:
                with pytest.raises(ProtocolError, match="max_frame is 1024"):
                    await conn.request(ECHO, os.urandom(5000), 10)
                assert await conn.request(ECHO, "small", 10) == "small"

    with caplog.at_level(logging.ERROR, logger="pykv.net"):
        run(main())
    assert any("exceeds max_frame 1024" in r.getMessage() for r in caplog.records)


def test_a_truncated_frame_at_eof_is_logged_and_harms_nothing(caplog):
    async def main():
        async with Rig() as rig:
            reader, writer = await rig.raw_client()
            wire = encode_frame(ECHO, "x" * 100, request_id=1)
            writer.write(hello_frame() + wire[:50])
            await writer.drain()
            writer.write_eof()
            assert [f.kind for f in await read_frames(reader)] == [HELLO]
            writer.close()
            async with await Connection.open(rig.address) as conn:
                assert await conn.request(ECHO, "ok", 10) == "ok"

    with caplog.at_level(logging.ERROR, logger="pykv.net"):
        run(main())
    messages = [r.getMessage() for r in caplog.records]
    assert any("ended badly: stream ended inside a frame: 50 of 109 bytes received" in m for m in messages)


def test_a_handshake_version_mismatch_is_refused_on_both_sides():
    async def future_server(reader, writer):  # speaks the next protocol version
        writer.write(hello_frame(PROTOCOL_VERSION + 1))
        await writer.drain()
        await reader.read()
        writer.close()

    async def refusing_server(reader, writer):  # checks first, and refuses this version
        reason = f"protocol version mismatch: peer speaks 1, this side speaks {PROTOCOL_VERSION + 1}"
        writer.write(encode_frame(ERROR, {"type": "ProtocolError", "message": reason}))
        await writer.drain()
        writer.close()

    async def main():
        async with Rig() as rig:
            reader, writer = await rig.raw_client()
            writer.write(hello_frame(PROTOCOL_VERSION + 1))
            frames = await read_frames(reader)
            writer.close()
            assert [f.kind for f in frames] == [ERROR]  # a server says HELLO only to a good one
            assert "protocol version mismatch" in frames[0].body["message"]
        other = await asyncio.start_server(future_server, "127.0.0.1", 0)
        port = other.sockets[0].getsockname()[1]
        with pytest.raises(ProtocolError, match="protocol version mismatch: peer speaks 2"):
            await Connection.open(f"127.0.0.1:{port}")
        other.close()
        other = await asyncio.start_server(refusing_server, "127.0.0.1", 0)
        port = other.sockets[0].getsockname()[1]
        with pytest.raises(ProtocolError, match="this side speaks 2"):  # the peer's reason
            await Connection.open(f"127.0.0.1:{port}")
        other.close()

    run(main())


def test_the_wire_bytes_are_those_of_earlier_releases():
    """A peer that speaks only the version-1 bytes (HELLO at once, then frames of
    [request_id, body]) interoperates with this code in both directions."""

    async def old_server(reader, writer):
        writer.write(HELLO_V1)
        assert await reader.readexactly(len(HELLO_V1)) == HELLO_V1
        length, kind = HEADER.unpack(await reader.readexactly(HEADER.size))
        request_id, body = msgpack.unpackb(await reader.readexactly(length))
        reply = msgpack.packb([request_id, [0, body]])  # a node's tagged [OK, result]
        writer.write(HEADER.pack(len(reply), RESPONSE) + reply)
        await writer.drain()
        await reader.read()
        writer.close()

    async def main():
        assert hello_frame() == HELLO_V1
        other = await asyncio.start_server(old_server, "127.0.0.1", 0)
        port = other.sockets[0].getsockname()[1]
        async with await Connection.open(f"127.0.0.1:{port}") as conn:
            assert await conn.request(ECHO, "hi", 10) == [0, "hi"]
        other.close()
        async with Rig() as rig:  # an old client: HELLO then a request, both at once
            reader, writer = await rig.raw_client()
            request = msgpack.packb([7, "hi"])
            writer.write(HELLO_V1 + HEADER.pack(len(request), ECHO) + request)
            assert await reader.readexactly(len(HELLO_V1)) == HELLO_V1
            reply = msgpack.packb([7, "hi"])
            assert await reader.readexactly(HEADER.size + len(reply)) == (
                HEADER.pack(len(reply), RESPONSE) + reply
            )
            writer.close()

    run(main())


def test_a_closed_server_connection_fails_pending_requests_with_unavailable():
    async def main():
        async with Rig() as rig:
            conn = await Connection.open(rig.address)
            pending = asyncio.ensure_future(conn.request(NEVER, None, 30))
            await until(lambda: rig.connections and conn.in_flight == 1)
            for server_side in list(rig.connections):
                server_side.close()
            with pytest.raises(Unavailable, match="lost"):
                await pending
            with pytest.raises(Unavailable, match="closed"):
                await conn.request(ECHO, 1, 10)

    run(main())


def test_a_client_that_does_not_read_its_replies_is_not_read_either():
    """Flow control: the server stops reading a client while its replies pile up unread,
    and serves it again, losing nothing, once it reads them."""
    payload = os.urandom(256 << 10)  # incompressible: the replies fill the socket buffers
    count = 200

    async def main():
        async with Rig() as rig:
            reader, writer = await rig.raw_client()
            writer.write(hello_frame())
            for i in range(count):
                writer.write(encode_frame(ECHO, payload, request_id=i + 1))
            await until(lambda: any(c.reading_paused for c in rig.connections))
            decoder, replies = FrameDecoder(), []
            while len(replies) < count + 1:  # HELLO, then every reply
                replies.extend(decoder.feed(await asyncio.wait_for(reader.read(1 << 20), 10)))
            writer.close()
            assert [f.request_id for f in replies[1:]] == list(range(1, count + 1))
            assert all(f.body == payload for f in replies[1:])

    run(main())


def test_many_garbage_clients_at_once_do_not_disturb_a_busy_good_client():
    rng = random.Random(1234)
    garbage = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))) for _ in range(20)]

    async def vandal(rig, junk):
        reader, writer = await rig.raw_client()
        writer.write(hello_frame() + junk if rng.random() < 0.5 else junk)
        writer.write_eof()
        await read_frames(reader, FrameDecoder(max_frame=1 << 30))
        writer.close()

    async def main():
        async with Rig() as rig, await Connection.open(rig.address) as good:
            work = asyncio.gather(*(good.request(ECHO, i, 10) for i in range(500)))
            await asyncio.gather(*(vandal(rig, junk) for junk in garbage))
            assert await work == list(range(500))
            assert len(rig.connections) == 1

    run(main())


class FewInFlight(App):
    max_in_flight = 64


def test_a_client_with_too_many_requests_unanswered_is_not_read_until_half_are_answered():
    """Each unanswered request holds server memory: past max_in_flight the server stops
    reading that client, and reads on, losing nothing, once half of them are answered."""
    count = 1000

    async def main():
        async with Rig(app=FewInFlight) as rig:
            reader, writer = await rig.raw_client()
            writer.write(hello_frame())
            for i in range(count):
                pad = os.urandom(4096)  # many socket reads' worth of requests, not one
                writer.write(encode_frame(LATER, {"delay": 0.2, "pad": pad}, request_id=i + 1))
            await until(lambda: any(c.reading_paused for c in rig.connections))
            assert rig.received < count  # it stopped reading while the replies were due
            decoder, replies = FrameDecoder(), []
            while len(replies) < count + 1:  # HELLO, then every reply
                replies.extend(decoder.feed(await asyncio.wait_for(reader.read(1 << 20), 10)))
            writer.close()
            assert sorted(f.request_id for f in replies[1:]) == list(range(1, count + 1))
            assert rig.received == count

    run(main())
