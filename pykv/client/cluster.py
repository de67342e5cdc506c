"""The cluster backends of pykv.api: reads, commits (single-shard or 2PC) and scans over the network.

``AsyncCluster`` is the asyncio core. ``ClusterBackend`` is the synchronous ``Backend`` of
``pykv.api.KeyValueStore``: it runs an ``AsyncCluster`` on an event loop in a background
thread, so one client serves any number of threads at once (each call blocks only its
caller; the requests of all threads are pipelined over the same connections).

Reads: ``KeyValueStore.get`` is linearizable (the shard leader confirms its leadership with a
ReadIndex round before answering). A transaction's reads are optimistic: the leader answers
from its applied state at once (unless a prepared transaction or a pending proposal may still
change the key: then the read waits like a linearizable one), and the commit validates every
read version, so a stale answer from a deposed leader can only make the commit conflict.

Commit protocol, as the client drives it:

- a read-only transaction commits by confirming, with one linearizable read per shard after
  all its reads, that every version it read is still current (see ``_confirm_reads``);
- every key of the transaction maps to a shard (hash ring partition); a transaction whose
  keys all live in one shard is ONE ``COMMIT`` proposal on that shard's leader, validated
  when every replica applies it;
- otherwise two-phase commit over the shards' Raft groups: ``PREPARE`` each shard's part
  (validate + lock, replicated) -> ``COMMIT_DECIDE`` on the coordinator shard (its own part
  and the commit record; the first decision recorded wins) -> ``FINISH`` on every other
  participant, sent by the coordinator shard's leader (pykv.server.node). The commit is
  acknowledged once the decision is commit. Should the client die at any point, each
  participant's leader settles its prepared part with the coordinator shard (see
  pykv.server.node), so no transaction stays in doubt; keys of a prepared transaction
  stay locked until then, and reads of them wait, so nobody sees half a transaction.

The steps themselves are pykv.replica.commitflow's, which the transaction simulator runs too.
Every call is retried across leader changes until the timeout; that is safe because the
replicas remember each transaction id's outcome (a retried commit never applies twice).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Generator, Iterator
from typing import Any, TypeVar

from pykv.api import HybridClock
from pykv.client.bridge import LoopBridge
from pykv.client.router import Router, check_timeout
from pykv.client.transport import (
    COMMIT,
    COMMIT_DECIDE,
    DECIDE,
    EXPORT,
    FINISH,
    LOAD,
    PREPARE,
    READ,
    RESOLVER,
    RESOLVERS,
    SCAN,
    WIPE,
)
from pykv.embedded import store_loader
from pykv.errors import (
    InvalidOperation,
    KeyLocked,
    StoreClosed,
    Timeout,
    TransactionConflict,
    Unavailable,
)
from pykv.net.protocol import new_event_loop
from pykv.replica import commitflow
from pykv.replica import shard as cmd
from pykv.replica.commitflow import (
    BACKUP_ATTEMPTS,
    BACKUP_PAUSE,
    BACKUP_RETRIED,
    EXPORT_CALL_ATTEMPTS,
    ExportPass,
    PagedPass,
    Round,
    Scanned,
    Send,
    commit_rounds,
    export_pages,
    export_rounds,
    holders,
    read_batches,
    read_pass,
    resolvers_of,
    scan_rounds,
    snapshot_rounds,
    stream_scan_rounds,
)
from pykv.replica.failpoints import failpoint
from pykv.txn.model import EVERY_KEY, CommitRequest, KeyRange, KeyUpdate, ScanItems, Versioned
from pykv.txn.resolvers import BUILTIN, ResolverRegistry
from pykv.types import MAX_SCAN_BYTES, TxnIdSource

T = TypeVar("T")

# Consistent scans taken again after their range lock was released under them.
SCAN_ATTEMPTS = 3
# Seconds before a load that a prepared transaction's lock refused is sent again (doubling).
LOAD_PAUSE = 0.01

# The request kind that carries each command of a commit or scan (pykv.replica.commitflow).
_KINDS = {cmd.COMMIT: COMMIT, cmd.PREPARE: PREPARE, cmd.COMMIT_DECIDE: COMMIT_DECIDE,
          cmd.DECIDE: DECIDE, cmd.FINISH: FINISH, commitflow.SCAN: SCAN, commitflow.READ: READ,
          commitflow.EXPORT: EXPORT}


class AsyncCluster:
    """The asyncio operations of a cluster client (one event loop)."""

    def __init__(self, addresses: list[str], *, timeout: float = 10.0) -> None:
        self.router = Router(list(addresses), timeout=timeout)
        self.timeout = timeout
        self._background: set[asyncio.Task] = set()
        # For the locks of consistent scans (their own transaction ids and timestamps).
        self._txids = TxnIdSource()
        self._clock = HybridClock()
        self.rounds: Counter[str] = Counter()  # rounds of commits and scans sent, by name

    async def start(self) -> None:
        await self.router.refresh_map()

    def shard_of(self, key: str) -> int:
        return self.router.shard_of(key)

    async def read(self, key: str, *, optimistic: bool = False) -> Versioned:
        """A linearizable read of key; ``optimistic``: the leader answers from its state at
        once, without confirming its leadership (a transaction's commit validates it)."""
        router = self.router
        if router.map is None:
            await router.refresh_map()
        shard = router.shard_of(key)
        body = [shard, [key], True] if optimistic else [shard, [key]]
        versions = await router.call(shard, READ, body)
        return Versioned.from_wire(versions[0])

    async def read_many(
        self, keys: list[str], *, optimistic: bool = False, clocks_only: bool = False
    ) -> dict[str, Versioned]:
        """Linearizable reads of many keys, every request at once (commitflow.read_batches:
        one per shard, or more for many keys); not one snapshot (that is ``snapshot``).
        ``optimistic`` as in read(); ``clocks_only``: versions without their values."""
        await self.router.ensure_map()
        batches = read_batches(keys, self.shard_of)
        flags = [optimistic, True] if clocks_only else [True] if optimistic else []
        replies = await settled([self.router.call(s, READ, [s, ks, *flags]) for s, ks in batches])
        out = {}
        for (_, ks), versions in zip(batches, replies, strict=True):
            if isinstance(versions, Exception):
                raise versions
            for key, wire in zip(ks, versions, strict=True):
                out[key] = Versioned.from_wire(wire)
        return out

    async def snapshot(self, keys: list[str]) -> dict[str, Versioned]:
        """One snapshot of ``keys``: versions all current at one moment while it ran
        (commitflow.snapshot_rounds: passes, then a lock when writers keep changing them)."""
        await self.router.ensure_map()
        batches = read_batches(keys, self.shard_of)
        return await self._locking((), lambda lock: snapshot_rounds(lock, batches))

    async def commit(self, request: CommitRequest) -> None:
        router = self.router
        if router.map is None:
            await router.refresh_map()
        if not request.writes:
            await self._confirm_reads(request)
            return
        await self._drive_to_the_end(commit_rounds(request, router.shard_of))

    async def _drive_to_the_end(self, flow: Generator[Round, Any, T]) -> T:
        """_drive a flow that takes locks to its end, even when the caller is cancelled (a
        timeout of its own: asyncio.timeout, wait_for). Abandoned halfway, it would leave its
        prepared keys or its range locked on the participants until their recovery settles
        them (recovery_after, 2 s), and every writer of those keys would wait as long: 32
        clients transferring between 32 accounts with such timeouts committed 78 transfers in
        15 s, against 5,106 without. The caller still gets CancelledError."""
        task = asyncio.get_running_loop().create_task(self._drive(flow))
        self._background.add(task)
        task.add_done_callback(self._finished_task)
        return await asyncio.shield(task)

    async def _drive(self, flow: Generator[Round, Any, T]) -> T:
        """Send each round of a commit or scan flow (pykv.replica.commitflow) and hand its
        results back; returns what the flow returns."""
        results: list[Any] | None = None
        while True:
            try:
                round_ = flow.send(results)
            except StopIteration as done:
                return done.value
            self.rounds[round_.name] += 1
            if round_.pause:
                await asyncio.sleep(round_.pause)
            calls = self._calls(round_.sends, round_.timeout)
            if not round_.wait:
                self._in_background(calls)  # a lost FINISH is settled by the participant's recovery
                results = None
                continue
            if round_.name == "decide":
                failpoint("txn.2pc.after_prepare")
            if round_.keep:
                results = await self._keeping(round_, settled(calls))
            else:
                results = await settled(calls)
            if round_.name == "decide":
                failpoint("txn.2pc.after_decide")

    def _calls(self, sends: list[Send], timeout: float | None = None) -> list[Coroutine[Any, Any, Any]]:
        router = self.router
        return [
            router.call(s.shard, _KINDS[s.command], [s.shard, *s.args], timeout=timeout) if s.node is None
            else self._export_call(s.node, s.shard, s.args)
            for s in sends
        ]

    async def _export_call(self, node: int, shard: int, args: list) -> Any:
        """An EXPORT request to the node that holds the export, asked up to
        EXPORT_CALL_ATTEMPTS times within the client's timeout (a page asked again is
        answered again): TransactionConflict when it does not answer or left the cluster
        (the export is lost with it)."""
        address = (await self.router.ensure_map()).nodes.get(node)
        if address is None:
            raise TransactionConflict(f"node {node} left the cluster with shard {shard}'s export; read again")
        for attempt in range(EXPORT_CALL_ATTEMPTS):
            try:
                return await self.router.call_address(
                    address, EXPORT, [shard, *args], self.timeout / EXPORT_CALL_ATTEMPTS
                )
            except (Unavailable, Timeout) as exc:
                if attempt == EXPORT_CALL_ATTEMPTS - 1:
                    raise TransactionConflict(f"node {node}, which holds shard {shard}'s export, "
                                              f"did not answer ({exc}); read again") from exc
        raise AssertionError("unreachable")

    async def round(self, sends: list[Send]) -> list[Any]:
        """The results of one round of requests (each its reply or the error it raised)."""
        return await settled(self._calls(sends))

    async def _keeping(self, round_: Round, results: Coroutine[Any, Any, list[Any]]) -> list[Any]:
        """``results``, sending ``round_.keep`` again every ``round_.keep_every`` seconds
        until they are in (answers unused: see Round.keep)."""

        async def renew() -> None:
            while True:
                await asyncio.sleep(round_.keep_every)
                await settled(self._calls(round_.keep))

        renewing = asyncio.get_running_loop().create_task(renew())
        try:
            return await results
        finally:
            renewing.cancel()

    async def _confirm_reads(self, request: CommitRequest) -> None:
        """Commit a read-only transaction: every version it read must still be current.

        One linearizable read per shard, after all of the transaction's reads. A version
        current at its check was current ever since it was written (versions never repeat),
        so every read version was current at the moment of the last read: the transaction
        is serialized there, inside its own lifetime, even if a read was optimistic. No
        Raft proposal and no two-phase commit are needed.
        """
        current = await self.read_many(list(request.reads), clocks_only=True)
        for key, seen in request.reads.items():
            if current[key].clock != seen.clock:
                raise TransactionConflict(
                    f"transaction {request.txid}: {key!r} changed after it was read"
                )

    def _in_background(self, calls: list[Coroutine[Any, Any, Any]]) -> None:
        for call in calls:
            task = asyncio.get_running_loop().create_task(call)
            self._background.add(task)
            task.add_done_callback(self._finished_task)

    def _finished_task(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled():
            task.exception()  # a lost FINISH is settled by the participant's recovery

    async def scan_pages(self, paged: PagedPass) -> ScanItems:
        """The next items of a scan: its shards' next pages (one round), merged in order."""
        replies = await asyncio.gather(*self._calls(paged.sends()))
        paged.feed(replies)
        return paged.ready()

    async def paged_scan(
        self, prefix: str, start: str | None, end: str | None, limit: int | None,
        deleted: bool = False,
    ) -> PagedPass:
        """A scan of every shard a page at a time (feed it to scan_pages until done): each
        page a linearizable read of its shard, pages and shards at different moments."""
        view = await self.router.ensure_map()
        return PagedPass(KeyRange(prefix, start, end), list(range(view.partitions)), limit, deleted)

    async def scan(
        self, prefix: str, start: str | None, end: str | None, limit: int | None,
        deleted: bool = False, max_bytes: int = MAX_SCAN_BYTES,
    ) -> ScanItems:
        """Every item of one pass (commitflow.read_pass, as paged_scan reads it): at most
        ``limit`` live keys, with ``deleted`` the tombstones of deleted keys among them too;
        ScanTooLarge past ``max_bytes``."""
        view = await self.router.ensure_map()
        shards = list(range(view.partitions))
        key_range = KeyRange(prefix, start, end)
        return await self._drive(read_pass(key_range, shards, limit, deleted=deleted, max_bytes=max_bytes))

    async def consistent_scan(
        self, prefix: str, start: str | None, end: str | None, limit: int | None,
        max_bytes: int = MAX_SCAN_BYTES,
    ) -> ScanItems:
        """One snapshot of the range across every shard: passes until two agree, else
        exports of the range begun at one moment under a lock (pykv.replica.commitflow.
        scan_rounds). A scan whose lock was taken away before the exports began (it outlived
        the shards' recovery time), or whose export was lost, is taken again, up to
        SCAN_ATTEMPTS times."""
        return await self._scan_with(scan_rounds, KeyRange(prefix, start, end), limit, max_bytes)

    async def stream_consistent_scan(
        self, prefix: str, start: str | None, end: str | None, limit: int | None,
        max_bytes: int = MAX_SCAN_BYTES,
    ) -> Scanned:
        """consistent_scan for a caller that iterates (commitflow.stream_scan_rounds): past
        ``max_bytes`` held, what is held and the exports left to read (Scanned.rest), which
        ``export_step`` reads on; taken again as consistent_scan is until it returns."""
        return await self._scan_with(stream_scan_rounds, KeyRange(prefix, start, end), limit, max_bytes)

    async def _scan_with(
        self, rounds: Callable[..., Generator[Round, Any, T]], key_range: KeyRange, limit: int | None,
        max_bytes: int,
    ) -> T:
        """Drive a consistent scan's ``rounds`` (scan_rounds or stream_scan_rounds) of
        ``key_range`` over every shard, under _locking's retries."""
        view = await self.router.ensure_map()
        shards = list(range(view.partitions))
        return await self._locking((key_range,), lambda lock: rounds(lock, shards, limit, max_bytes=max_bytes))

    async def export_step(self, rest: ExportPass) -> ScanItems:
        """The next items of a streamed scan's exports: their next pages (one round), in
        order. TransactionConflict when an export is lost (its node restarted or stopped
        answering, or nobody asked a page of it for imaging.EXPORT_IDLE_S)."""
        rest.feed(await self.round(rest.sends()))
        return rest.ready()

    def end_exports(self, rest: ExportPass) -> None:
        """Drop the exports of a streamed scan its caller stopped reading (in the background)."""
        self._in_background(self._calls(rest.ends()))

    async def _locking(
        self, ranges: tuple[KeyRange, ...], flow_of: Callable[[CommitRequest], Generator[Round, Any, T]]
    ) -> T:
        """Drive ``flow_of(lock)``, a flow that may lock what it reads with ``lock`` (its own
        transaction id and timestamp, holding ``ranges``); again with a new lock when the
        flow's lock was taken away before it ended (it outlived the shards' recovery time),
        up to SCAN_ATTEMPTS times."""
        attempts = SCAN_ATTEMPTS
        while True:
            attempts -= 1
            lock = CommitRequest(self._txids.next_id(), 0, {}, (), timestamp=self._clock.now(), ranges=ranges)
            try:
                return await self._drive_to_the_end(flow_of(lock))
            except TransactionConflict:
                if not attempts:
                    raise

    async def begin_export(self) -> tuple[int, list[list]]:
        """Begin a backup: every shard's export at one moment (commitflow.export_rounds).
        Returns the exports' id and each shard's [node id, [], True, its resolvers] (the
        node that holds its export: an ExportPass reads it)."""
        view = await self.router.ensure_map()
        shards = list(range(view.partitions))
        tried: list[int] = []

        def flow_of(lock: CommitRequest) -> Generator[Round, Any, list]:
            tried.append(lock.txid)
            return export_rounds(lock, shards)

        try:
            begun = await self._locking((EVERY_KEY,), flow_of)
        except BaseException:
            self._in_background([self.end_export(txid, shards) for txid in tried])
            raise
        self._in_background([self.end_export(txid, shards) for txid in tried[:-1]])
        return tried[-1], begun

    async def end_export(self, export_id: int, shards: list[int]) -> None:
        """Drop the exports a failed begin may have left (asked of each shard's leader, which
        began it), so that their views stop keeping versions."""
        await settled([self.router.call(s, EXPORT, [s, export_id, "end"]) for s in shards])

    async def wipe(self) -> None:
        """Forget every key, resolver and remembered outcome on every shard (for tests)."""
        view = await self.router.ensure_map()
        await asyncio.gather(*(self.router.call(s, WIPE, [s]) for s in range(view.partitions)))

    async def register_resolver(self, prefix: str, name: str | None) -> None:
        """Register a built-in resolver by name on every shard; None unregisters the prefix."""
        view = await self.router.ensure_map()
        await asyncio.gather(
            *(self.router.call(s, RESOLVER, [s, prefix, name]) for s in range(view.partitions))
        )

    async def load(self, items: list[tuple[str, Versioned]]) -> None:
        """Store versions another store committed, their clocks and timestamps kept (pykv
        restore; ShardState._load says what a key the cluster holds gets), every shard's part
        at once. A part that a prepared transaction holds a key of is sent again after a
        pause, until the client's timeout; a part loaded twice is loaded once."""
        router = self.router
        await router.ensure_map()
        parts: dict[int, list[list]] = {}
        for key, version in items:
            update = KeyUpdate(key, version.value, version.clock, version.timestamp)
            parts.setdefault(router.shard_of(key), []).append(update.to_wire())
        await asyncio.gather(*(self._load_part(shard, part) for shard, part in parts.items()))

    async def _load_part(self, shard: int, part: list[list]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        pause = LOAD_PAUSE
        while True:
            try:
                await self.router.call(shard, LOAD, [shard, part], timeout=max(0.001, deadline - loop.time()))
                return
            except KeyLocked:
                if loop.time() + pause > deadline:
                    raise
            await asyncio.sleep(pause)
            pause = min(2 * pause, 20 * LOAD_PAUSE)

    async def resolver_names(self) -> dict[str, str]:
        """{prefix: built-in name} as shard 0 keeps them (a linearizable read on its leader;
        register_resolver registers a name on every shard)."""
        await self.router.ensure_map()
        names = await self.router.call(0, RESOLVERS, [0])
        return {prefix: names[prefix] for prefix in sorted(names)}

    async def close(self) -> None:
        if self._background:
            await asyncio.wait(list(self._background), timeout=self.timeout)
        await self.router.close()


def copy_cluster(run: Callable[[Coroutine[Any, Any, T]], T], core: AsyncCluster, target: str,
                 progress: Callable[[int, int], None] | None = None) -> None:
    """Copy every live key of the cluster, as of one moment inside the call, into a new
    embedded store at ``target`` (their clocks and timestamps kept): every shard's export
    (pykv.replica.imaging) read a page at a time, the pages written in this thread.
    ``run(coroutine)`` runs one of ``core``'s on its loop, from this thread.
    ``progress(shards done, shards)``. Begun again, after a pause, when an export is lost
    (a node holding one restarted or stopped answering meanwhile) or a shard had no leader
    to begin one (commitflow.EXPORT_BEGIN_TIMEOUT), up to BACKUP_ATTEMPTS times."""
    attempts = BACKUP_ATTEMPTS
    while True:
        attempts -= 1
        try:
            _copy_once(run, core, target, progress)
            return
        except BACKUP_RETRIED:
            if not attempts:
                raise
            time.sleep(BACKUP_PAUSE)


def _copy_once(run: Callable[[Coroutine[Any, Any, Any]], Any], core: AsyncCluster, target: str,
               progress: Callable[[int, int], None] | None) -> None:
    with store_loader(target, "backup") as loader:
        export_id, begun = run(core.begin_export())
        loader.keep_resolvers(resolvers_of(begun))
        paged = ExportPass(export_id, holders(list(range(len(begun))), begun), EVERY_KEY, None, ordered=False)

        def take(items: ScanItems) -> None:
            loader.add(items)
            if progress is not None:
                progress(paged.shards_done, len(begun))

        flow = export_pages(paged, take)  # its rounds run one by one, the pages written here
        results: list[Any] | None = None
        while True:
            try:
                round_ = flow.send(results)
            except StopIteration:
                return
            results = run(core.round(round_.sends))


async def settled(calls: list[Coroutine[Any, Any, T]]) -> list[T | Exception]:
    """``asyncio.gather(*calls, return_exceptions=True)`` for a task: the first call runs in
    it, the others in tasks of their own (gather would make one per call, and a future)."""
    if not calls:
        return []
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(call) for call in calls[1:]]
    results: list[T | Exception] = []
    try:
        for call in (calls[0], *tasks):
            try:
                results.append(await call)
            except Exception as exc:  # noqa: BLE001 - a vote, as gather would return it
                results.append(exc)
    finally:
        for task in tasks:
            task.cancel()  # when this task is cancelled, as gather cancels its children
    return results


class ClusterResolvers(ResolverRegistry):
    """Resolver registrations that every replica of every shard applies in its log order.

    Only built-in resolvers can run on the servers, so a function is refused with
    InvalidOperation; a name is replicated to every shard before register() returns.
    """

    def __init__(self, backend: ClusterBackend) -> None:
        super().__init__()
        self._backend = backend

    def register(self, prefix: str, resolver: Any) -> None:
        if not isinstance(resolver, str):
            raise InvalidOperation(
                "a cluster runs resolvers on its servers: register a built-in name "
                f"({', '.join(sorted(BUILTIN))}), not {resolver!r}"
            )
        super().register(prefix, resolver)  # validates the name and the prefix
        self._backend._run(self._backend.core.register_resolver(prefix, resolver))

    def unregister(self, prefix: str) -> None:
        super().unregister(prefix)
        self._backend._run(self._backend.core.register_resolver(prefix, None))

    def names(self) -> dict[str, str]:
        """The cluster's registrations (every shard keeps the same), not only this client's."""
        return self._backend._run(self._backend.core.resolver_names())


class ClusterBackend:
    """The ``pykv.api.Backend`` of a cluster (thread-safe; see the module docstring)."""

    def __init__(self, addresses: list[str], *, timeout: float = 10.0) -> None:
        check_timeout(timeout)  # before any wait that uses it
        self.timeout = timeout
        self.node_id = 0  # the node that proposes a commit stamps its own id as coordinator
        self._loop = new_event_loop()
        self._bridge = LoopBridge(self._loop)
        self._thread = threading.Thread(target=self._loop.run_forever, name="pykv-client", daemon=True)
        self._thread.start()
        self._closed = False
        self.core: AsyncCluster = self._run(_make_core(addresses, timeout))
        try:
            self._run(self.core.start())
        except BaseException:
            self.close()
            raise
        self.resolvers = ClusterResolvers(self)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise StoreClosed("the cluster client is closed")
        try:
            # The coroutine has its own deadline; this one only guards against a stuck loop.
            return self._bridge.run(coro, self.timeout * 3 + 5)
        except TimeoutError:
            raise Timeout(f"the cluster did not answer within {self.timeout}s") from None

    optimistic_reads = True  # a transaction's reads skip the leadership round

    def mark(self) -> None:
        return None  # a log per shard: no one sequence for a transaction's reads to note against

    def read(self, key: str, *, optimistic: bool = False, mark: None = None) -> Versioned:
        return self._run(self.core.read(key, optimistic=optimistic))

    def read_many(self, keys: list[str], *, optimistic: bool = False, mark: None = None) -> dict[str, Versioned]:
        return self._run(self.core.read_many(keys, optimistic=optimistic))

    def snapshot(self, keys: list[str]) -> dict[str, Versioned]:
        return self._run(self.core.snapshot(keys))

    def wipe(self) -> None:
        """Forget every key, resolver and remembered outcome in the cluster (for tests that
        share one cluster; refused while a multi-shard transaction is prepared)."""
        self._run(self.core.wipe())

    def commit(self, request: CommitRequest) -> None:
        self._run(self.core.commit(request))

    def load(self, items: list[tuple[str, Versioned]]) -> None:
        """Store versions another store committed, clocks and timestamps kept (AsyncCluster.load)."""
        self._run(self.core.load(items))

    def scan(
        self, prefix: str, start: str | None, end: str | None, limit: int | None,
        deleted: bool = False,
    ) -> Iterator[tuple[str, Versioned]]:
        paged = self._run(self.core.paged_scan(prefix, start, end, limit, deleted))
        while not paged.done:  # a page per shard at a time, as the caller iterates
            yield from self._run(self.core.scan_pages(paged))

    def consistent_scan(
        self, prefix: str, start: str | None, end: str | None, limit: int | None,
        max_bytes: int = MAX_SCAN_BYTES,
    ) -> Iterator[tuple[str, Versioned]]:
        """One snapshot of the range; past ``max_bytes`` held, read on from its exports as the
        caller iterates (AsyncCluster.stream_consistent_scan)."""
        scanned = self._run(self.core.stream_consistent_scan(prefix, start, end, limit, max_bytes))
        rest = scanned.rest
        try:
            yield from scanned.items
            while rest is not None and not rest.done:  # a page per shard at a time
                yield from self._run(self.core.export_step(rest))
        finally:
            if rest is not None and not rest.done and not self._closed:
                self._loop.call_soon_threadsafe(self.core.end_exports, rest)

    def backup(self, target: str, progress: Callable[[int, int], None] | None = None) -> None:
        copy_cluster(self._run, self.core, target, progress)

    def close(self) -> None:
        """Close the connections; a call other threads have under way fails at once with
        StoreClosed (it may have committed, as after a Timeout), as does any call after."""
        if self._closed:
            return
        self._closed = True
        closing = [self._bridge.close(lambda: StoreClosed("the cluster client was closed during the call"))]
        if hasattr(self, "core"):
            closing.append(self.core.close())
        for coro in closing:
            try:
                asyncio.run_coroutine_threadsafe(coro, self._loop).result(5)
            except Exception:  # noqa: BLE001 - closing anyway
                pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


async def _make_core(addresses: list[str], timeout: float) -> AsyncCluster:
    return AsyncCluster(addresses, timeout=timeout)
