"""LoopBridge: blocking callers in many threads get their own coroutine's result or error."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Iterator

import pytest

from pykv.client.bridge import LoopBridge
from pykv.net.protocol import new_event_loop


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


async def _hang(cancelled: threading.Event) -> None:
    """Wait for a minute, unless cancelled: then set ``cancelled``."""
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        cancelled.set()
        raise


def test_each_thread_gets_its_own_result(loop: asyncio.AbstractEventLoop) -> None:
    bridge = LoopBridge(loop)

    async def echo(value: tuple[int, int]) -> tuple[int, int]:
        await asyncio.sleep(0.001 * (value[1] % 3))  # out of order
        return value

    wrong: list[tuple] = []

    def caller(thread: int) -> None:
        for i in range(200):
            got = bridge.run(echo((thread, i)), timeout=10)
            if got != (thread, i):
                wrong.append((thread, i, got))

    threads = [threading.Thread(target=caller, args=(t,)) for t in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_an_error_reaches_its_caller(loop: asyncio.AbstractEventLoop) -> None:
    async def fail() -> None:
        await asyncio.sleep(0)
        raise KeyError("gone")

    with pytest.raises(KeyError, match="gone"):
        LoopBridge(loop).run(fail(), timeout=10)


def test_a_call_past_its_timeout_is_cancelled_on_the_loop(loop: asyncio.AbstractEventLoop) -> None:
    cancelled = threading.Event()

    bridge = LoopBridge(loop)
    with pytest.raises(TimeoutError):
        bridge.run(_hang(cancelled), timeout=0.2)
    assert cancelled.wait(5)

    async def answer() -> int:
        return 42

    assert bridge.run(answer(), timeout=10) == 42  # the bridge serves on


def test_a_coroutine_cancelled_on_the_loop_fails_its_caller_with_an_exception(
    loop: asyncio.AbstractEventLoop,
) -> None:
    async def cancelled_there() -> None:
        asyncio.current_task().cancel()  # as a closing client cancels what it runs
        await asyncio.sleep(0)

    with pytest.raises(concurrent.futures.CancelledError):  # an Exception, not a BaseException
        LoopBridge(loop).run(cancelled_there(), timeout=10)


def test_close_answers_the_calls_under_way_and_later_ones_and_ends_their_coroutines(
    loop: asyncio.AbstractEventLoop,
) -> None:
    bridge = LoopBridge(loop)
    cancelled = threading.Event()

    got: list[BaseException] = []

    def caller() -> None:
        try:
            bridge.run(_hang(cancelled), timeout=30)
        except BaseException as exc:  # noqa: BLE001 - what the caller got
            got.append(exc)

    waiting = threading.Thread(target=caller)
    waiting.start()
    time.sleep(0.2)
    asyncio.run_coroutine_threadsafe(bridge.close(lambda: LookupError("closed")), loop).result(10)
    waiting.join(5)
    assert not waiting.is_alive() and [type(e) for e in got] == [LookupError]
    assert cancelled.is_set()  # its coroutine was cancelled, and ended, before close returned

    async def answer() -> int:
        return 42

    with pytest.raises(LookupError, match="closed"):
        bridge.run(answer(), timeout=10)
