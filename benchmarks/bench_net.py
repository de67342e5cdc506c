"""Round trips per second over loopback: pykv.net against a raw asyncio echo, same run.

Client and server share one uvloop event loop in this process, so the figures count
both ends' CPU; compare the ratios, not the absolute numbers, across machines.

From the repo root; the pytest form works as is (``python3 -m`` puts the root on
sys.path and benchmarks/conftest.py collects bench_*.py), the script form needs pykv
installed (``pip install -e .``):

    python3 -m pytest benchmarks/bench_net.py -q   # pytest-benchmark table
    python3 benchmarks/bench_net.py [ROUNDS]       # round trips/s and ratios to raw asyncio
"""

from __future__ import annotations

import asyncio
import collections
import sys
import time

import pytest
import uvloop

from pykv.net.protocol import Connection, ServerProtocol

N = 1000
ECHO = 16
MESSAGE = b"x" * 16


class _EchoServer(ServerProtocol):
    """The least a pykv server can do: answer every request with its body, at once."""

    def request_received(self, kind, request_id, body):
        self.respond(request_id, body)


class _RawEchoServer(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


class _RawClient(asyncio.Protocol):
    """The least a request/response client can do: a future per message, FIFO replies.

    No framing, no encoding, no request ids: each 16-byte message comes back as-is and
    completes the oldest waiting future.
    """

    def __init__(self) -> None:
        self.waiting: collections.deque[asyncio.Future] = collections.deque()
        self.partial = 0

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        count, self.partial = divmod(self.partial + len(data), len(MESSAGE))
        for _ in range(count):
            self.waiting.popleft().set_result(MESSAGE)

    async def request(self, message: bytes) -> bytes:
        future = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        self.transport.write(message)
        return await future


class Rig:
    """A raw echo server, a pykv server, and a client of each, on one event loop."""

    def __init__(self) -> None:
        self.runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        self.runner.run(self._start())

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self.raw_server = await loop.create_server(_RawEchoServer, "127.0.0.1", 0)
        port = self.raw_server.sockets[0].getsockname()[1]
        _, self.raw = await loop.create_connection(_RawClient, "127.0.0.1", port)
        self.server = await loop.create_server(_EchoServer, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.conn = await Connection.open(f"127.0.0.1:{port}")

    async def raw_sequential(self) -> None:
        for _ in range(N):
            await self.raw.request(MESSAGE)

    async def raw_pipelined(self) -> None:
        await asyncio.gather(*(self.raw.request(MESSAGE) for _ in range(N)))

    async def pykv_sequential(self) -> None:
        for _ in range(N):
            await self.conn.request(ECHO, MESSAGE, 10)

    async def pykv_pipelined(self) -> None:
        await asyncio.gather(*(self.conn.request(ECHO, MESSAGE, 10) for _ in range(N)))

    def close(self) -> None:
        async def stop():
            self.conn.close()
            self.raw.transport.close()
            self.server.close()
            self.raw_server.close()

        self.runner.run(stop())
        self.runner.close()


CASES = ["raw_sequential", "raw_pipelined", "pykv_sequential", "pykv_pipelined"]


@pytest.fixture(scope="module")
def rig():
    rig = Rig()
    yield rig
    rig.close()


@pytest.mark.parametrize("case", CASES)
def test_round_trips(benchmark, rig, case):
    """One benchmark round = N round trips of a 16-byte message."""
    method = getattr(rig, case)
    benchmark.extra_info["round_trips_per_round"] = N
    benchmark.pedantic(lambda: rig.runner.run(method()), rounds=20, warmup_rounds=2)


def main(rounds: int = 30) -> None:
    rig = Rig()
    rates = {}
    for case in CASES:
        method = getattr(rig, case)
        rig.runner.run(method())  # warm up
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            rig.runner.run(method())
            best = min(best, time.perf_counter() - start)
        rates[case] = N / best
    rig.close()
    print(f"{N} round trips of a 16-byte message per round, best of {rounds} rounds")
    for case in CASES:
        baseline = rates["raw_" + case.split("_")[1]]
        print(
            f"  {case:<16} {rates[case]:>12,.0f} round trips/s   {rates[case] / baseline:5.2f}x raw"
        )
    print(
        f"  pipelined/sequential speed-up, pykv: {rates['pykv_pipelined'] / rates['pykv_sequential']:.1f}x"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
