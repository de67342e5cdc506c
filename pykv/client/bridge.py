"""Runs coroutines on an event loop thread for blocking callers, a lock hand-over per call.

``asyncio.run_coroutine_threadsafe`` costs a blocking caller a concurrent Future (a
Condition, a fresh lock per wait), a chained-future callback and a wake-up of the loop per
call; a sync cluster client makes three such calls per transaction from each of its
threads. ``LoopBridge.run`` queues the coroutine and waits on a lock of its own that the
loop releases when the coroutine ends; the loop is woken only when the queue was empty, so
a burst of calls from many threads costs one wake-up (64 threads of the standard
transaction: 0.36 ms of client CPU per transaction with run_coroutine_threadsafe, 0.30-0.32
with this; a call from 64 threads 20 us of CPU against 30).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections import deque
from collections.abc import Coroutine
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class _Call(Generic[T]):
    """One coroutine to run, and what its caller waits on: ``ended`` is held until it ends."""

    __slots__ = ("coro", "ended", "result", "error", "task")

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self.coro = coro
        self.ended = threading.Lock()
        self.ended.acquire()
        self.result: T | None = None
        self.error: BaseException | None = None
        self.task: asyncio.Task | None = None

    def finished(self, task: asyncio.Task) -> None:
        if task.cancelled():  # as run_coroutine_threadsafe's future says it: an Exception
            self.error = concurrent.futures.CancelledError()
        else:
            self.error = task.exception()
            if self.error is None:
                self.result = task.result()
        self.ended.release()


class LoopBridge:
    """``run(coro, timeout)`` from any thread but the loop's: the coroutine runs on ``loop``
    (which runs in another thread) and its result or exception comes back to the caller."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: deque[_Call] = deque()
        # True from a caller's wake-up call until the loop starts taking the queue. A caller
        # that finds it set queued its call before the loop clears it, hence before the loop
        # takes the queue (the GIL orders these steps), so no call waits unseen.
        self._wake_pending = False

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """The coroutine's result (or exception); TimeoutError, with the coroutine cancelled,
        when it has not ended within ``timeout`` seconds."""
        call: _Call[T] = _Call(coro)
        self._queue.append(call)
        if not self._wake_pending:
            self._wake_pending = True
            self._loop.call_soon_threadsafe(self._start_queued)
        if not call.ended.acquire(timeout=timeout):
            self._loop.call_soon_threadsafe(self._cancel, call)
            raise TimeoutError(f"the call did not end within {timeout}s")
        if call.error is not None:
            raise call.error
        return call.result  # type: ignore[return-value]

    def _start_queued(self) -> None:
        self._wake_pending = False
        queue, loop = self._queue, self._loop
        while queue:
            call = queue.popleft()
            call.task = loop.create_task(call.coro)
            call.task.add_done_callback(call.finished)

    def _cancel(self, call: _Call) -> None:
        if call.task is None:  # not started yet: it never will be
            self._queue.remove(call)
            call.coro.close()
        else:
            call.task.cancel()
