"""Real sockets on 127.0.0.1 under uvloop: pipelining, containment of bad peers, the pool."""

from __future__ import annotations

import asyncio
import logging
import random
import socket

import pytest

from pykv.errors import Error, ProtocolError, Timeout, TransactionConflict, Unavailable
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
from pykv.net.protocol import Connection, PeerPool, new_event_loop, serve

ECHO, SLOW_ECHO, CONFLICT, BUG, SLEEP, RECORD = 16, 17, 18, 19, 20, 21


def run(coro):
    loop = new_event_loop()
    assert type(loop).__module__.startswith("uvloop")  # the loop pykv runs on
    loop.close()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(coro)


class App:
    """A handler with a few behaviours, recording one-way messages."""

    def __init__(self) -> None:
        self.recorded: list = []

    async def __call__(self, kind, body):
        if kind == ECHO:
            return body
        if kind == SLOW_ECHO:  # later requests overtake earlier ones
            await asyncio.sleep(body["delay"])
            return body
        if kind == CONFLICT:
            raise TransactionConflict(f"key {body!r} changed")
        if kind == BUG:
            raise ValueError("handler bug")
        if kind == SLEEP:
            await asyncio.sleep(body)
            return "woke"
        if kind == RECORD:
            self.recorded.append(body)
            return None
        raise Error(f"unknown kind {kind}")


async def raw_client(port: int):
    return await asyncio.open_connection("127.0.0.1", port)


async def read_frames(reader, decoder=None):
    """Everything the server sends until it closes the connection, as frames."""
    decoder = decoder or FrameDecoder()
    frames = []
    while chunk := await asyncio.wait_for(reader.read(65536), 10):
        frames.extend(decoder.feed(chunk))
    return frames


def test_requests_and_errors_round_trip():
    async def main():
        async with await serve(App()) as server:
            async with await Connection.open("127.0.0.1", server.port) as conn:
                assert await conn.request(ECHO, {"k": [1, b"2"]}) == {"k": [1, b"2"]}
                with pytest.raises(TransactionConflict, match="key 'x' changed"):
                    await conn.request(CONFLICT, "x")
                with pytest.raises(Error, match="remote ValueError .*: handler bug"):
                    await conn.request(BUG, None)
                assert await conn.request(ECHO, b"z" * 200_000) == b"z" * 200_000  # zstd
                assert conn.in_flight == 0

    run(main())


def test_pipelining_1000_requests_on_one_connection():
    async def main():
        async with await serve(App()) as server:
            async with await Connection.open("127.0.0.1", server.port) as conn:
                bodies = [{"i": i, "delay": (1000 - i) / 200_000} for i in range(1000)]
                replies = await asyncio.gather(*(conn.request(SLOW_ECHO, b) for b in bodies))
                assert replies == bodies
                assert len(server.connections) == 1

    run(main())


def test_one_way_messages_arrive_in_order():
    async def main():
        app = App()
        async with await serve(app) as server:
            async with await Connection.open("127.0.0.1", server.port) as conn:
                for i in range(100):
                    await conn.send(RECORD, i)
                await conn.request(ECHO, "barrier")
                assert app.recorded == list(range(100))

    run(main())


def test_timeout_leaves_the_connection_usable():
    async def main():
        async with await serve(App()) as server:
            async with await Connection.open("127.0.0.1", server.port) as conn:
                with pytest.raises(Timeout, match="outcome is unknown"):
                    await conn.request(SLEEP, 30, timeout=0.05)
                assert await conn.request(ECHO, 1, timeout=10) == 1

    run(main())


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\n\r\n",  # before any handshake
        hello_frame() + HEADER.pack(5, 16) + b"\xc1\xc1\xc1\xc1\xc1",  # bad msgpack
        hello_frame() + encode_frame(RESPONSE, "not a request", request_id=1),  # wrong kind
    ],
    ids=["http", "bad-msgpack", "client-sends-response"],
)
def test_a_garbage_client_is_disconnected_and_a_good_one_keeps_working(garbage, caplog):
    async def main():
        async with await serve(App()) as server:
            async with await Connection.open("127.0.0.1", server.port) as good:
                assert await good.request(ECHO, "before") == "before"
                reader, writer = await raw_client(server.port)
                writer.write(garbage)
                frames = await read_frames(reader)  # ends: the server closed on it
                writer.close()
                assert frames[-1].kind == ERROR
                assert await good.request(ECHO, "after") == "after"
                assert len(server.connections) == 1

    with caplog.at_level(logging.WARNING, logger="pykv.net"):
        run(main())
    (record,) = [r for r in caplog.records if getattr(r, "event", None) == "protocol_error"]
    assert record.getMessage().startswith("event=protocol_error side=server peer=127.0.0.1:")
    assert record.fields["side"] == "server"


def test_an_oversized_frame_is_rejected_before_it_is_buffered():
    async def main():
        async with await serve(App(), max_frame=1024) as server:
            reader, writer = await raw_client(server.port)
            writer.write(hello_frame() + HEADER.pack(1 << 30, 16))  # claims a 1 GiB payload
            frames = await read_frames(reader)
            writer.close()
            assert frames[0].kind == HELLO
            assert frames[-1].kind == ERROR
            assert "frame length 1073741824 exceeds max_frame 1024" in frames[-1].body["message"]
            # A client sending an oversized request learns why, and others are unaffected.
            async with await Connection.open("127.0.0.1", server.port) as conn:
                with pytest.raises(ProtocolError, match="exceeds max_frame 1024"):
                    await conn.request(ECHO, b"\x01" * 5000, timeout=10)
            async with await Connection.open("127.0.0.1", server.port) as conn:
                assert await conn.request(ECHO, "small") == "small"

    run(main())


def test_a_truncated_frame_is_logged_and_harms_nothing(caplog):
    async def main():
        async with await serve(App()) as server:
            reader, writer = await raw_client(server.port)
            wire = encode_frame(ECHO, "x" * 100, request_id=1)
            writer.write(hello_frame() + wire[:50])
            await writer.drain()
            writer.write_eof()
            await read_frames(reader)
            writer.close()
            async with await Connection.open("127.0.0.1", server.port) as conn:
                assert await conn.request(ECHO, "ok") == "ok"

    with caplog.at_level(logging.WARNING, logger="pykv.net"):
        run(main())
    messages = [r.getMessage() for r in caplog.records]
    assert any("stream ended inside a frame" in m for m in messages), messages


def test_handshake_version_mismatch_is_refused_on_both_sides():
    async def fake_server(reader, writer):  # speaks a future protocol version
        writer.write(hello_frame(PROTOCOL_VERSION + 1))
        await writer.drain()
        await reader.read()
        writer.close()

    async def main():
        async with await serve(App()) as server:
            reader, writer = await raw_client(server.port)
            writer.write(hello_frame(PROTOCOL_VERSION + 1))
            frames = await read_frames(reader)
            writer.close()
            assert [f.kind for f in frames] == [ERROR]
            assert "protocol version mismatch" in frames[0].body["message"]

        other = await asyncio.start_server(fake_server, "127.0.0.1", 0)
        port = other.sockets[0].getsockname()[1]
        with pytest.raises(ProtocolError, match="protocol version mismatch"):
            await Connection.open("127.0.0.1", port)
        other.close()

    run(main())


def test_server_shutdown_fails_pending_requests_with_unavailable():
    async def main():
        server = await serve(App())
        conn = await Connection.open("127.0.0.1", server.port)
        pending = asyncio.ensure_future(conn.request(SLEEP, 30))
        await asyncio.sleep(0.05)
        await server.close()
        with pytest.raises(Unavailable, match="lost"):
            await pending
        with pytest.raises(Unavailable):
            await conn.request(ECHO, 1)

    run(main())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_peer_pool_reuses_one_connection_and_reconnects():
    async def main():
        server = await serve(App())
        address = server.address
        pool = PeerPool()
        conns = await asyncio.gather(*(pool.get(address) for _ in range(10)))
        assert all(c is conns[0] for c in conns)
        assert await pool.request(address, ECHO, 1) == 1
        port = server.port
        await server.close()
        await asyncio.sleep(0.05)
        server = await serve(App(), port=port)  # same address, new process in real life
        assert await pool.request(address, ECHO, 2) == 2
        assert (await pool.get(address)) is not conns[0]
        await pool.close()
        await server.close()

    run(main())


def test_peer_pool_backs_off_after_failures():
    async def main():
        now = [100.0]
        address = f"127.0.0.1:{free_port()}"  # nobody listens here
        pool = PeerPool(backoff_initial=1.0, backoff_max=4.0, clock=lambda: now[0])
        with pytest.raises(Unavailable, match="cannot connect"):
            await pool.get(address)
        with pytest.raises(Unavailable, match=r"1 failed attempts.*next attempt in"):
            await pool.get(address)  # within the backoff: not even tried
        now[0] += 1.0
        with pytest.raises(Unavailable, match="cannot connect"):
            await pool.get(address)  # tried again, failed again: backoff doubles
        now[0] += 1.0
        with pytest.raises(Unavailable, match="2 failed attempts"):
            await pool.get(address)
        # The peer comes up: after the backoff the pool connects and resets.
        server = await serve(App(), port=int(address.rsplit(":", 1)[1]))
        now[0] += 2.0
        assert await pool.request(address, ECHO, "up") == "up"
        await pool.close()
        await server.close()
        with pytest.raises(Unavailable, match="closed"):
            await pool.get(address)

    run(main())


def test_many_garbage_clients_at_once_do_not_disturb_a_busy_good_client():
    rng = random.Random(1234)
    garbage = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))) for _ in range(20)]

    async def vandal(port, junk):
        reader, writer = await raw_client(port)
        writer.write(hello_frame() + junk if rng.random() < 0.5 else junk)
        writer.write_eof()
        await read_frames(reader, FrameDecoder(max_frame=1 << 30))
        writer.close()

    async def main():
        async with await serve(App()) as server:
            async with await Connection.open("127.0.0.1", server.port) as good:
                work = asyncio.gather(*(good.request(ECHO, i) for i in range(500)))
                await asyncio.gather(*(vandal(server.port, junk) for junk in garbage))
                assert await work == list(range(500))
                assert len(server.connections) == 1

    run(main())


def test_backpressure_limits_requests_in_flight_without_deadlock():
    async def main():
        async with await serve(App(), max_in_flight=4) as server:
            async with await Connection.open("127.0.0.1", server.port) as conn:
                bodies = [{"i": i, "delay": 0.001} for i in range(200)]
                assert await asyncio.gather(*(conn.request(SLOW_ECHO, b) for b in bodies)) == bodies

    run(main())


def test_an_unencodable_reply_becomes_an_error_for_that_request_only():
    async def handler(kind, body):
        return object() if body == "bad" else body

    async def main():
        async with await serve(handler) as server:
            async with await Connection.open("127.0.0.1", server.port) as conn:
                with pytest.raises(ProtocolError, match="cannot be encoded"):
                    await conn.request(ECHO, "bad")
                assert await conn.request(ECHO, "good") == "good"

    run(main())
