"""The asyncio client of a cluster: ``await pykv.aio.connect([...])``, the embedded API as coroutines.

    db = await pykv.aio.connect(["127.0.0.1:7401"])
    async with db.transaction() as tx:
        tx["b"] = (await tx.get("a", "0")) + "!"
    await db.transact(lambda tx: tx.incr("n", 1))
    await db.put("k", "v"); await db.get("k")

Everything that may talk to the cluster is a coroutine (reads, commits, single-operation
writes, scans); the buffered writes of a transaction (``put``, ``delete``, ``incr``,
``append``, ``tx[k] = v``) are plain methods, since they only record the mutation.

A transaction's bookkeeping (read-your-writes, folding several writes of one key, the
versions it observed, the limit checks) is pykv.api.Transaction itself, run over a backend
that never blocks: a read is fetched with ``await`` first and then handed to it, and its
commit request is captured and sent with ``await``. So the semantics are exactly those of
the sync API.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any, TypeVar

from pykv._engine.vclock import VClock
from pykv.api import (
    KeyValueStore,
    OpenTransactions,
    Transaction,
    distinct_keys,
    many_keys,
    many_values,
)
from pykv.client.cluster import AsyncCluster, copy_cluster
from pykv.client.router import seed_addresses
from pykv.errors import InvalidOperation, StoreClosed, TransactionConflict
from pykv.txn.model import CommitRequest, Versioned
from pykv.txn.resolvers import BUILTIN, ResolverRegistry
from pykv.types import MAX_SCAN_BYTES, MAX_TXN_BYTES, MAX_TXN_OPS, MAX_VALUE_BYTES, Value, check_key

T = TypeVar("T")
_MISSING = object()


class _Prefetched:
    """A Backend for pykv.api.Transaction that answers reads from what was fetched already
    and captures the commit request instead of sending it (one per transaction)."""

    __slots__ = ("versions", "request")
    node_id = 0
    optimistic_reads = True  # the transaction's reads were fetched optimistically
    resolvers = ResolverRegistry()  # never used: resolvers are registered on the servers

    def __init__(self) -> None:
        self.versions: dict[str, Versioned] = {}
        self.request: CommitRequest | None = None

    def mark(self) -> None:
        return None  # a cluster's: see ClusterBackend.mark

    def read(self, key: str, *, optimistic: bool = False, mark: None = None) -> Versioned:
        return self.versions[key]

    def read_many(self, keys: list[str], *, optimistic: bool = False, mark: None = None) -> dict[str, Versioned]:
        return {key: self.versions[key] for key in keys}

    def commit(self, request: CommitRequest) -> None:
        self.request = request

    def scan(
        self, prefix: str, start: str | None, end: str | None, limit: int | None,
        deleted: bool = False,
    ) -> Iterator:
        raise InvalidOperation("scan is not part of a transaction")

    def consistent_scan(self, prefix: str, start: str | None, end: str | None, limit: int | None) -> list:
        raise InvalidOperation("scan is not part of a transaction")

    def close(self) -> None:
        pass


class AsyncTransaction:
    """One transaction of an AsyncKeyValueStore (``async with db.transaction() as tx``)."""

    def __init__(self, store: AsyncKeyValueStore, isolation: str) -> None:
        self._store = store
        self._backend = _Prefetched()
        self._tx: Transaction = store._local._transaction(isolation, self._backend)
        self.id = self._tx.id
        self._outcome: str | None = None

    @property
    def state(self) -> str:
        return self._outcome or self._tx.state

    async def _fetch(self, key: str) -> None:
        check_key(key)
        if key not in self._backend.versions:
            self._backend.versions[key] = await self._store._core.read(key, optimistic=True)

    async def get(self, key: str, default: Any = None) -> Any:
        """The value as this transaction sees it (its own writes included), or default."""
        self._store._ensure_open()
        await self._fetch(key)
        return self._tx.get(key, default)

    def _start_from(self, snapshot: dict[str, Versioned]) -> None:
        """See pykv.api.Transaction._start_from."""
        self._backend.versions.update(snapshot)
        self._tx._start_from(snapshot)

    def _read_only_keys(self) -> list[str]:
        return self._tx._read_only_keys()

    async def get_many(self, keys: Iterable[str], default: Any = None) -> dict[str, Any]:
        """What get() returns for each key; the keys not read yet are fetched together (one
        request per shard, all at once)."""
        self._store._ensure_open()
        wanted = distinct_keys(keys)
        versions = self._backend.versions
        missing = [key for key in wanted if key not in versions]
        if missing:
            versions.update(await self._store._core.read_many(missing, optimistic=True))
        return self._tx.get_many(wanted, default)

    async def get_versioned(self, key: str) -> tuple[Any, VClock]:
        await self._fetch(key)
        return self._tx.get_versioned(key)

    async def contains(self, key: str) -> bool:
        return await self.get(key, _MISSING) is not _MISSING

    def put(self, key: str, value: Value, *, context: VClock | bytes | None = None) -> None:
        self._tx.put(key, value, context=context)

    def __setitem__(self, key: str, value: Value) -> None:
        self._tx.put(key, value)

    def delete(self, key: str, *, context: VClock | bytes | None = None) -> None:
        self._tx.delete(key, context=context)

    def __delitem__(self, key: str) -> None:
        self._tx.delete(key)

    def incr(self, key: str, amount: int = 1) -> None:
        self._tx.incr(key, amount)

    def append(self, key: str, item: str | int | bytes) -> None:
        self._tx.append(key, item)

    async def commit(self) -> None:
        """Validate and apply atomically; raises TransactionConflict etc. with nothing applied.

        Cancelled (asyncio.timeout, wait_for), the commit still runs to its end in the
        background, so that it leaves no key locked: as after a Timeout, it may have
        committed."""
        self._store._ensure_open()
        self._tx.commit()  # local checks; captures the request when validation is needed
        request, self._backend.request = self._backend.request, None
        try:
            if request is not None:
                await self._store._core.commit(request)
        except BaseException:
            self._outcome = "aborted"
            raise
        finally:
            self._store._finished(self.id, self.state)

    async def abort(self) -> None:
        self._discard()

    def _discard(self) -> None:
        """Abort here: nothing of this transaction was sent yet."""
        self._tx.abort()
        self._store._finished(self.id, self.state)

    async def __aenter__(self) -> AsyncTransaction:
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self.state != "open":
            return
        if exc_type is None:
            await self.commit()
        else:
            await self.abort()


def _local_limit(name: str) -> property:
    """A read-only property: the limit ``name`` of the store's local KeyValueStore."""
    return property(lambda store: getattr(store._local, name), doc=f"This store's {name}.")


class AsyncKeyValueStore:
    """The asyncio counterpart of pykv.KeyValueStore over a cluster (one event loop)."""

    def __init__(
        self, core: AsyncCluster, *, max_txn_ops: int, max_value_bytes: int,
        max_scan_bytes: int = MAX_SCAN_BYTES, max_txn_bytes: int = MAX_TXN_BYTES,
    ) -> None:
        self._core = core
        # The client side of every transaction (ids, hybrid clock, limits), shared so that
        # ids and timestamps come from one source; each transaction reads and commits
        # through a _Prefetched backend of its own, never through this one.
        self._local = KeyValueStore(
            _Prefetched(), max_txn_ops=max_txn_ops, max_value_bytes=max_value_bytes,
            max_scan_bytes=max_scan_bytes, max_txn_bytes=max_txn_bytes,
        )
        self._by_id: OpenTransactions[AsyncTransaction] = OpenTransactions(AsyncTransaction._discard)
        self._closed = False
        # Its connections belong to the loop it connected in (connect() runs in it).
        self._loop = asyncio.get_running_loop()

    # The limits, as the sync store has them (read-only: they belong to the local side).
    max_txn_ops = _local_limit("max_txn_ops")
    max_txn_bytes = _local_limit("max_txn_bytes")
    max_value_bytes = _local_limit("max_value_bytes")
    max_scan_bytes = _local_limit("max_scan_bytes")

    @property
    def closed(self) -> bool:
        """Whether close() was called."""
        return self._closed

    def _ensure_open(self) -> None:
        if self._closed:
            raise StoreClosed("the store is closed; connect again to continue")
        self._local._ensure_open()  # refuses in a forked child, as the sync store does
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return  # a plain call (db.transaction()) outside any loop: nothing sent yet
        if running is not self._loop:
            raise StoreClosed(
                "this client connected in another event loop (each asyncio.run() makes its "
                "own), which holds its connections: connect again in this one"
            )

    def _finished(self, txid: int, outcome: str) -> None:
        self._by_id.finished(txid, outcome)

    # --- transactions --------------------------------------------------------------------

    def transaction(self, isolation: str = "serializable") -> AsyncTransaction:
        self._ensure_open()
        return AsyncTransaction(self, isolation)

    async def transact(
        self,
        fn: Callable[[AsyncTransaction], Awaitable[T] | T],
        *,
        retries: int = 16,
        backoff: float = 0.001,
        max_backoff: float = 0.1,
        isolation: str = "serializable",
    ) -> T:
        """Run fn(tx) (a coroutine function or a plain one) and commit; rerun on conflict (a
        read-only attempt from one snapshot of what it read, as KeyValueStore.transact)."""
        attempt = 0
        snapshot_keys: list[str] = []
        while True:
            tx = self.transaction(isolation)
            try:
                if snapshot_keys:  # a read-only attempt conflicted: see KeyValueStore.transact
                    tx._start_from(await self._core.snapshot(snapshot_keys))
                result = fn(tx)
                if inspect.isawaitable(result):
                    result = await result
                await tx.commit()
                return result  # type: ignore[return-value]
            except TransactionConflict:
                if attempt >= retries:
                    raise
                snapshot_keys = tx._read_only_keys()
            finally:
                if tx.state == "open":
                    await tx.abort()
            await asyncio.sleep(random.uniform(0.0, min(max_backoff, backoff * (2**attempt))))
            attempt += 1

    def begin_transaction(self, isolation: str = "serializable") -> int:
        tx = self.transaction(isolation)
        self._by_id.add(tx.id, tx)
        return tx.id

    max_open_transactions = OpenTransactions.limit()

    def _lookup(self, txid: int) -> AsyncTransaction:
        self._ensure_open()
        return self._by_id.get(txid)

    async def read(self, txid: int, key: str, default: Any = None) -> Any:
        return await self._lookup(txid).get(key, default)

    async def write(self, txid: int, key: str, value: Value) -> None:
        self._lookup(txid).put(key, value)

    async def commit_transaction(self, txid: int) -> None:
        await self._lookup(txid).commit()

    async def abort_transaction(self, txid: int) -> None:
        await self._lookup(txid).abort()

    # --- single operations -------------------------------------------------------------------

    async def get(self, key: str, default: Any = None) -> Any:
        self._ensure_open()
        check_key(key)
        seen = await self._core.read(key)
        return default if not seen.exists else seen.value

    async def get_many(self, keys: Iterable[str], default: Any = None) -> dict[str, Any]:
        """{key: value, or default} for every key, as one snapshot: see
        pykv.api.KeyValueStore.get_many."""
        self._ensure_open()
        wanted = many_keys(keys, self.max_txn_ops)
        return many_values(wanted, await self._core.snapshot(wanted), default)

    async def get_versioned(self, key: str) -> tuple[Any, VClock]:
        self._ensure_open()
        check_key(key)
        seen = await self._core.read(key)
        return (seen.value if seen.exists else None), VClock.decode(seen.clock)

    async def _single(self, fill: Callable[[AsyncTransaction], None]) -> None:
        tx = self.transaction()
        fill(tx)
        await tx.commit()

    async def put(self, key: str, value: Value, *, context: VClock | bytes | None = None) -> None:
        await self._single(lambda tx: tx.put(key, value, context=context))

    async def delete(self, key: str, *, context: VClock | bytes | None = None) -> None:
        await self._single(lambda tx: tx.delete(key, context=context))

    async def incr(self, key: str, amount: int = 1) -> None:
        await self._single(lambda tx: tx.incr(key, amount))

    async def append(self, key: str, item: str | int | bytes) -> None:
        await self._single(lambda tx: tx.append(key, item))

    async def scan(
        self, prefix: str = "", *, start: str | None = None, end: str | None = None,
        limit: int | None = None, consistent: bool = True,
    ) -> list[tuple[str, Any]]:
        """(key, value) of live keys with the prefix in [start, end), in key order; one
        snapshot of the range unless ``consistent=False`` (see KeyValueStore.scan). Either
        way the whole range is returned at once: ScanTooLarge past ``max_scan_bytes``
        (``scan_iter`` reads any range as the caller iterates)."""
        self._check_scan(prefix, start, end)
        budget = self._local.max_scan_bytes
        if consistent:
            items = await self._core.consistent_scan(prefix, start, end, limit, budget)
        else:
            items = await self._core.scan(prefix, start, end, limit, max_bytes=budget)
        return [(k, v.value) for k, v in items]

    async def scan_iter(
        self, prefix: str = "", *, start: str | None = None, end: str | None = None,
        limit: int | None = None, consistent: bool = False,
    ) -> AsyncIterator[tuple[str, Any]]:
        """``scan`` read as the caller iterates (``async for``), so a range of any size fits
        in memory. By default one pass, the shards sending a page (about 1 MiB) at a time,
        as ``scan(consistent=False)``. With ``consistent=True``, one snapshot of the range as
        the synchronous client's scan takes it: held up to ``max_scan_bytes``, then read on
        from the shards' exports of that moment (an export lost after that, with its node,
        raises TransactionConflict from the iteration: scan again)."""
        self._check_scan(prefix, start, end)
        if consistent:
            async for item in self._consistent_iter(prefix, start, end, limit):
                yield item
            return
        paged = await self._core.paged_scan(prefix, start, end, limit)
        while not paged.done:
            for key, version in await self._core.scan_pages(paged):
                yield key, version.value

    async def _consistent_iter(
        self, prefix: str, start: str | None, end: str | None, limit: int | None,
    ) -> AsyncIterator[tuple[str, Any]]:
        core = self._core
        scanned = await core.stream_consistent_scan(prefix, start, end, limit, self._local.max_scan_bytes)
        rest = scanned.rest
        try:
            for key, version in scanned.items:
                yield key, version.value
            while rest is not None and not rest.done:
                for key, version in await core.export_step(rest):
                    yield key, version.value
        finally:
            if rest is not None and not rest.done:
                core.end_exports(rest)

    def _check_scan(self, prefix: str, start: str | None, end: str | None) -> None:
        self._ensure_open()
        for bound in (start, end, prefix or None):
            if bound is not None:
                check_key(bound)

    async def backup(self, path: str | os.PathLike, progress: Callable[[int, int], None] | None = None) -> None:
        """Copy every shard, as of one moment inside the call, into a new embedded store at
        ``path`` (pykv.KeyValueStore.backup of a cluster); the pages are written by a
        worker thread, so this loop keeps serving. ``progress(shards done, shards)``, called
        in that thread."""
        self._ensure_open()
        loop = self._loop

        def run(coro: Any) -> Any:
            return asyncio.run_coroutine_threadsafe(coro, loop).result(self._core.timeout * 3 + 5)

        await asyncio.to_thread(copy_cluster, run, self._core, os.fspath(path), progress)

    async def register_resolver(self, prefix: str, resolver: str) -> None:
        """Use a built-in resolver (by name) for keys with the prefix, on every replica."""
        self._ensure_open()
        if not isinstance(resolver, str) or resolver not in BUILTIN:
            raise InvalidOperation(
                f"a cluster runs resolvers on its servers: use a built-in name ({', '.join(sorted(BUILTIN))})"
            )
        await self._core.register_resolver(prefix, resolver)

    async def resolvers(self) -> dict[str, str]:
        """The cluster's registered resolvers, {prefix: built-in name} in prefix order."""
        self._ensure_open()
        return await self._core.resolver_names()

    async def unregister_resolver(self, prefix: str) -> None:
        """Forget the resolver registered for exactly ``prefix``, on every replica."""
        self._ensure_open()
        await self._core.register_resolver(prefix, None)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._local._opened_by is None:  # in a forked child, the connections are the parent's
            await self._core.close()

    async def __aenter__(self) -> AsyncKeyValueStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def connect(
    addresses: list[str] | str,
    *,
    timeout: float = 10.0,
    max_txn_ops: int = MAX_TXN_OPS,
    max_value_bytes: int = MAX_VALUE_BYTES,
    max_scan_bytes: int = MAX_SCAN_BYTES,
    max_txn_bytes: int = MAX_TXN_BYTES,
) -> AsyncKeyValueStore:
    """Connect to a cluster through any subset of its node addresses (see pykv.client.connect)."""
    core = AsyncCluster(seed_addresses(addresses), timeout=timeout)
    try:
        await core.start()
    except BaseException:
        await core.close()
        raise
    return AsyncKeyValueStore(core, max_txn_ops=max_txn_ops, max_value_bytes=max_value_bytes,
                              max_scan_bytes=max_scan_bytes, max_txn_bytes=max_txn_bytes)


__all__ = ["AsyncKeyValueStore", "AsyncTransaction", "connect"]
