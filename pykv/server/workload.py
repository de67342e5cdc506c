"""The standard benchmark workload of DESIGN §7, driven over any pykv.KeyValueStore.

A "4-op transaction" reads 2 keys and writes 2: a read-modify-write of the first key read
and a blind write of another key; keys are uniform over 100,000, values are 100 bytes.
``clients`` clients each keep one transaction in flight; a conflict is retried at once and
counted, and a transaction's latency runs from its first attempt to its successful commit.
The driver only uses the public API: ``run_workload`` runs the clients as threads over a
KeyValueStore (the embedded store, or ``pykv.connect``), ``run_workload_async`` as
coroutines over one ``pykv.aio`` client (how an asyncio service would drive a cluster).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pykv.api import KeyValueStore, Transaction
from pykv.errors import Error, InvalidArgument, TransactionConflict
from pykv.types import MAX_TXN_OPS

if TYPE_CHECKING:
    from pykv.aio import AsyncKeyValueStore, AsyncTransaction

PRELOAD_BATCH = 2_000  # keys per preload transaction (well under max_txn_ops)


@dataclass(frozen=True)
class WorkloadConfig:
    """What to run: key space, value size, ops per transaction, clients and how long."""

    keys: int = 100_000
    value_bytes: int = 100
    ops: int = 4
    clients: int = 8
    duration: float = 10.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.keys < 2:
            raise InvalidArgument("the workload needs at least 2 keys")
        if not 2 <= self.ops <= MAX_TXN_OPS:
            raise InvalidArgument(f"ops must be between 2 and {MAX_TXN_OPS}")
        if self.value_bytes < 1 or self.clients < 1 or self.duration <= 0:
            raise InvalidArgument("value_bytes, clients and duration must be positive")

    @property
    def reads(self) -> int:
        return self.ops // 2

    @property
    def writes(self) -> int:
        return self.ops - self.reads


def key_name(index: int) -> str:
    return f"bench/{index:08d}"


def percentile(sorted_values: list[float], p: float) -> float:
    """The p-th percentile (0 to 100) of already sorted values, by rank; 0.0 when empty."""
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(p / 100 * len(sorted_values)))]


@dataclass
class _ClientStats:
    committed: int = 0
    conflicts: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, one per committed txn


@dataclass
class WorkloadResult:
    """Counts and latencies of one run; ``to_dict`` is what ``pykv bench --json`` prints."""

    config: WorkloadConfig
    elapsed: float
    committed: int
    conflicts: int
    errors: int
    latencies_ms: list[float]  # sorted

    @property
    def tps(self) -> float:
        return self.committed / self.elapsed if self.elapsed > 0 else 0.0

    def percentile_ms(self, p: float) -> float:
        return percentile(self.latencies_ms, p)

    @property
    def abort_rate(self) -> float:
        """Conflicted attempts over all attempts."""
        attempts = self.committed + self.conflicts
        return self.conflicts / attempts if attempts else 0.0

    def to_dict(self) -> dict:
        return {
            "tps": round(self.tps, 1),
            "p50_ms": round(self.percentile_ms(50), 3),
            "p99_ms": round(self.percentile_ms(99), 3),
            "committed": self.committed,
            "aborts": self.conflicts,
            "abort_rate": round(self.abort_rate, 5),
            "errors": self.errors,
            "duration_s": round(self.elapsed, 3),
            "clients": self.config.clients,
            "ops_per_txn": self.config.ops,
            "keys": self.config.keys,
            "value_bytes": self.config.value_bytes,
        }


def preload(
    store: KeyValueStore,
    config: WorkloadConfig,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write every key once (blind puts in batches), so reads find 100-byte values. A batch
    that conflicts (another client's transaction held a key, or took its participants long
    enough to be settled as abort) runs again: ``transact``."""
    rng = random.Random(config.seed)
    for first in range(0, config.keys, PRELOAD_BATCH):
        last = min(config.keys, first + PRELOAD_BATCH)
        batch = [(key_name(i), rng.randbytes(config.value_bytes)) for i in range(first, last)]

        def put_batch(tx: Transaction, batch: list[tuple[str, bytes]] = batch) -> None:
            for key, value in batch:
                tx.put(key, value)

        store.transact(put_batch)
        if progress is not None:
            progress(last - first)


def modify_value(old: object, rng: random.Random, size: int) -> bytes:
    """The read-modify-write: derive the new value from the old one (rotate its bytes).

    benchmarks/bench_embedded.py runs the same on sqlite3 and LMDB, so every engine writes
    alike.
    """
    if isinstance(old, bytes) and old:
        return old[1:] + old[:1]
    return rng.randbytes(size)


class _Plan:
    """One client's choices: which keys each transaction reads and writes, and the values."""

    def __init__(self, config: WorkloadConfig, index: int) -> None:
        self.config = config
        self.rng = random.Random(config.seed * 1_000_003 + index)

    def next(self) -> tuple[list[str], list[str], bytes]:
        c = self.config
        picked = self.rng.sample(range(c.keys), c.reads + c.writes - 1)
        keys = [key_name(i) for i in picked[: c.reads]]
        blind = [key_name(i) for i in picked[c.reads :]]
        return keys, blind, self.rng.randbytes(c.value_bytes)

    def write(self, tx: Transaction | AsyncTransaction, values: list, keys: list[str],
              blind: list[str], value: bytes) -> None:
        tx.put(keys[0], modify_value(values[0], self.rng, self.config.value_bytes))
        for key in blind:
            tx.put(key, value)


_OK, _CONFLICT, _ERROR = "ok", "conflict", "error"


_Job = tuple["_Plan", list[str], list[str], bytes]


def _script(config: WorkloadConfig, index: int, deadline: float,
            stats: _ClientStats) -> Generator[_Job, str, None]:
    """One client's loop, whatever runs it: yields (plan, keys, blind, value) for each attempt
    and is sent the attempt's outcome. A conflict is retried at once (the latency of a
    transaction runs from its first attempt); an error (Unavailable, Timeout) gives it up."""
    plan = _Plan(config, index)
    while time.perf_counter() < deadline:
        keys, blind, value = plan.next()
        started = time.perf_counter()
        outcome = yield plan, keys, blind, value
        while outcome == _CONFLICT:
            stats.conflicts += 1
            if time.perf_counter() >= deadline:
                return
            outcome = yield plan, keys, blind, value
        if outcome == _ERROR:
            stats.errors += 1
        else:
            stats.committed += 1
            stats.latencies.append(time.perf_counter() - started)


def _classify(exc: Error) -> str:
    return _CONFLICT if isinstance(exc, TransactionConflict) else _ERROR


def _attempt(store: KeyValueStore, plan: _Plan, keys: list[str], blind: list[str],
             value: bytes) -> str:
    tx = store.transaction()
    try:
        plan.write(tx, [tx.get(key) for key in keys], keys, blind, value)
        tx.commit()
    except Error as exc:
        if tx.state == "open":
            tx.abort()
        return _classify(exc)
    return _OK


def _client(store: KeyValueStore, config: WorkloadConfig, index: int, deadline: float,
            stats: _ClientStats) -> None:
    script = _script(config, index, deadline, stats)
    with contextlib.suppress(StopIteration):
        job = next(script)
        while True:
            job = script.send(_attempt(store, *job))


async def _client_async(store: AsyncKeyValueStore, config: WorkloadConfig, index: int,
                        deadline: float, stats: _ClientStats) -> None:
    """_client as a coroutine: the reads of a transaction go out together."""
    script = _script(config, index, deadline, stats)
    with contextlib.suppress(StopIteration):
        plan, keys, blind, value = next(script)
        while True:
            tx = store.transaction()
            try:
                plan.write(tx, list((await tx.get_many(keys)).values()), keys, blind, value)
                await tx.commit()
                outcome = _OK
            except Error as exc:
                outcome = _classify(exc)
                if tx.state == "open":
                    await tx.abort()
            plan, keys, blind, value = script.send(outcome)


def _result(config: WorkloadConfig, elapsed: float, stats: list[_ClientStats]) -> WorkloadResult:
    return WorkloadResult(
        config=config,
        elapsed=elapsed,
        committed=sum(s.committed for s in stats),
        conflicts=sum(s.conflicts for s in stats),
        errors=sum(s.errors for s in stats),
        latencies_ms=sorted(ms * 1000.0 for s in stats for ms in s.latencies),
    )


async def run_workload_async(
    store: AsyncKeyValueStore,
    config: WorkloadConfig,
    progress: Callable[[float, int], None] | None = None,
) -> WorkloadResult:
    """Run config.clients coroutines for config.duration seconds on the running loop;
    progress(elapsed, committed) is called about ten times a second."""
    stats = [_ClientStats() for _ in range(config.clients)]
    start = time.perf_counter()
    deadline = start + config.duration
    clients = asyncio.gather(
        *(_client_async(store, config, i, deadline, stats[i]) for i in range(config.clients))
    )
    while not clients.done():
        await asyncio.wait([clients], timeout=0.1)
        if progress is not None:
            progress(min(time.perf_counter() - start, config.duration),
                     sum(s.committed for s in stats))
    await clients  # re-raises a bug (not a conflict) from any client
    return _result(config, time.perf_counter() - start, stats)


def run_workload(
    store: KeyValueStore,
    config: WorkloadConfig,
    progress: Callable[[float, int], None] | None = None,
) -> WorkloadResult:
    """Run config.clients threads for config.duration seconds; progress(elapsed, committed)
    is called from this thread about ten times a second."""
    stats = [_ClientStats() for _ in range(config.clients)]
    failures: list[BaseException] = []
    start = time.perf_counter()
    deadline = start + config.duration

    def guarded(index: int) -> None:
        try:
            _client(store, config, index, deadline, stats[index])
        except BaseException as exc:  # a bug, not a conflict: re-raised below
            failures.append(exc)

    threads = [
        threading.Thread(target=guarded, args=(i,), name=f"pykv-bench-{i}", daemon=True)
        for i in range(config.clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.1)
            if progress is not None:
                progress(min(time.perf_counter() - start, config.duration),
                         sum(s.committed for s in stats))
    elapsed = time.perf_counter() - start
    if failures:
        raise failures[0]
    return _result(config, elapsed, stats)


def run_workload_on_cluster(
    addresses: list[str],
    config: WorkloadConfig,
    progress: Callable[[float, int], None] | None = None,
) -> WorkloadResult:
    """run_workload_async over a new pykv.aio client of the cluster at ``addresses``, on a
    uvloop event loop of its own (blocks until done)."""
    import pykv.aio
    from pykv.net.protocol import new_event_loop

    async def main() -> WorkloadResult:
        async with await pykv.aio.connect(addresses) as db:
            return await run_workload_async(db, config, progress)

    loop = new_event_loop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()
