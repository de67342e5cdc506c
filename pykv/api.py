"""The public transactional API (KeyValueStore, Transaction) over a Backend: embedded or cluster.

Everything that needs no backend round trip happens here, on the client side: transaction
ids, buffering writes, read-your-writes, recording the versions a transaction observed, the
limit checks of DESIGN §1 (before anything is sent) and the hybrid logical timestamps that the
``lww`` resolver orders by. The backend only reads, scans and commits (validate + apply).
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from pykv._engine.vclock import VClock
from pykv.codec import check_value_fits, size_bound
from pykv.errors import (
    InvalidArgument,
    InvalidValue,
    ReadOnlyStore,
    StoreClosed,
    TransactionAborted,
    TransactionConflict,
    TransactionTooLarge,
)
from pykv.txn.model import MISSING, CommitRequest, Isolation, Versioned, WriteOp
from pykv.txn.ops import fold_writes
from pykv.txn.resolvers import ResolverRegistry
from pykv.types import (
    INT64_MAX,
    INT64_MIN,
    MAX_SCAN_BYTES,
    MAX_TXN_BYTES,
    MAX_TXN_OPS,
    MAX_VALUE_BYTES,
    OpKind,
    TxnIdSource,
    Value,
    check_key,
    enum_decoder,
)

T = TypeVar("T")

# How many finished transaction ids the by-id API remembers, to say "already committed"
# rather than "unknown" when a caller reuses one.
_REMEMBERED_OUTCOMES = 65_536
# By-id transactions open at once (begin_transaction without a commit or abort yet). Each
# holds its reads and writes: ids a caller never finishes (a client of an RPC service that
# went away) grew the store without bound, 1.2 KB each. Past this, beginning one aborts the
# least recently used, whose id then says why (KeyValueStore.max_open_transactions).
MAX_OPEN_TRANSACTIONS = 100_000

# The stores open in this process. A child made by fork() inherits them without the threads
# that run them (the WAL writer, a cluster client's event loop), and with their locks copied
# as they were: every call would wait for ever. So the child's copies refuse every call.
_OPEN_STORES: weakref.WeakSet[KeyValueStore] = weakref.WeakSet()


def _disown_after_fork() -> None:
    for store in list(_OPEN_STORES):
        store._opened_by = os.getppid()
    _OPEN_STORES.clear()


os.register_at_fork(after_in_child=_disown_after_fork)

Tx = TypeVar("Tx")


class OpenTransactions(Generic[Tx]):
    """A store's transactions by id (DESIGN §2): the open ones, least recently used first
    and at most ``cap`` of them, and what the latest finished ones ended as (so that a
    late use of an id says why it is gone). Thread-safe; shared by the sync and asyncio
    stores. ``discard(tx)`` aborts one pushed out (nothing of it was sent yet)."""

    def __init__(self, discard: Callable[[Tx], None], cap: int = MAX_OPEN_TRANSACTIONS) -> None:
        self._discard = discard
        self._cap = cap
        self._open: OrderedDict[int, Tx] = OrderedDict()
        self._outcomes: OrderedDict[int, str] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def cap(self) -> int:
        return self._cap

    @cap.setter
    def cap(self, cap: int) -> None:
        if cap < 1:
            raise InvalidArgument(f"max_open_transactions must be at least 1, not {cap}")
        self._cap = cap

    def add(self, txid: int, tx: Tx) -> None:
        """Register an open transaction; abort the least recently used ones it pushes past
        ``cap`` (their ids now say so)."""
        evicted = []
        with self._lock:
            while self._open and len(self._open) >= self.cap:
                old_id, oldest = self._open.popitem(last=False)
                self._remember(old_id, f"aborted (the least recently used of more than "
                                       f"{self.cap:,} open transactions)")
                evicted.append(oldest)
            self._open[txid] = tx
        for oldest in evicted:
            # One already committing (in another thread, past more than cap begins) ends
            # as it will: its abort refuses, and this begin must not fail for it.
            with contextlib.suppress(TransactionAborted):
                self._discard(oldest)

    def get(self, txid: int) -> Tx:
        """The open transaction; TransactionAborted saying why when it is not open."""
        with self._lock:
            tx = self._open.get(txid)
            if tx is not None:
                self._open.move_to_end(txid)
                return tx
            outcome = self._outcomes.get(txid)
        if outcome is not None:
            raise TransactionAborted(f"transaction {txid} is already {outcome}; begin a new one")
        raise TransactionAborted(f"unknown transaction id {txid!r}")

    def finished(self, txid: int, outcome: str) -> None:
        with self._lock:
            if self._open.pop(txid, None) is not None:  # else not by id, or evicted
                self._remember(txid, outcome)

    def clear(self) -> None:
        with self._lock:
            self._open.clear()

    def __len__(self) -> int:
        return len(self._open)

    @staticmethod
    def limit() -> property:
        """A store's ``max_open_transactions`` property over its ``_by_id`` registry."""
        return property(
            lambda store: store._by_id.cap,
            lambda store, cap: setattr(store._by_id, "cap", cap),
            doc="By-id transactions open at once; beginning one more aborts the least "
                "recently used (MAX_OPEN_TRANSACTIONS by default).",
        )

    def _remember(self, txid: int, outcome: str) -> None:
        self._outcomes[txid] = outcome
        if len(self._outcomes) > _REMEMBERED_OUTCOMES:
            self._outcomes.popitem(last=False)


@dataclass(slots=True)
class ReadMark:
    """The moment a transaction's reads began, as the backend's sequence number then
    (``horizon``), and whether every version read since is at or before it (``before``).
    If so, each of them was current at that moment, which lies inside the transaction: a
    transaction that wrote nothing then read one snapshot of that moment, and its commit
    needs no validation (however busy the keys were meanwhile)."""

    horizon: int
    before: bool = True


class Backend(Protocol):
    """What a KeyValueStore needs from the store behind it (embedded storage or a cluster)."""

    node_id: int
    resolvers: ResolverRegistry
    # True when read(key, optimistic=True) may answer an old version (a cluster shard leader
    # answers from its state without a leadership round): the commit validates such reads.
    optimistic_reads: bool

    def mark(self) -> ReadMark | None:
        """A ReadMark of this moment for a transaction's reads to note against; None when
        the backend has no one sequence of versions (a cluster: a log per shard)."""
        ...

    def read(self, key: str, *, optimistic: bool = False, mark: ReadMark | None = None) -> Versioned:
        """The latest committed and durable version of key (a linearizable read).

        ``optimistic``: a transaction's read, which its commit validates, so it may be an
        older version where that is cheaper (see ``optimistic_reads``). ``mark``: cleared
        (``before = False``) when the version is newer than its horizon."""
        ...

    def read_many(
        self, keys: list[str], *, optimistic: bool = False, mark: ReadMark | None = None
    ) -> dict[str, Versioned]:
        """``read`` of every key, fetched together (on a cluster, one request per shard, all
        at once); not one snapshot: each key is read as ``read`` would."""
        ...

    def snapshot(self, keys: list[str]) -> dict[str, Versioned]:
        """The latest committed and durable version of every key, all current at one moment
        while the call ran (KeyValueStore.get_many)."""
        ...

    def commit(self, request: CommitRequest) -> None:
        """Validate and apply atomically; return once durable. Raises TransactionConflict,
        NonResolvableConflict, InvalidOperation or a limit error, with nothing applied."""
        ...

    def scan(
        self, prefix: str, start: str | None, end: str | None, limit: int | None,
        deleted: bool = False,
    ) -> Iterator[tuple[str, Versioned]]:
        """Live (non-deleted) keys with the prefix in [start, end), in key order, at most limit;
        with ``deleted``, the tombstones of deleted keys in that range too (not counted)."""
        ...

    def consistent_scan(
        self, prefix: str, start: str | None, end: str | None, limit: int | None,
        max_bytes: int = MAX_SCAN_BYTES,
    ) -> list[tuple[str, Versioned]]:
        """What ``scan`` returns, as one snapshot of the range (see KeyValueStore.scan);
        ScanTooLarge when a pass would hold more than ``max_bytes``."""
        ...

    def backup(self, target: str, progress: Callable[[int, int], None] | None = None) -> None:
        """Copy the store, as it is at one moment, into the new directory ``target`` while
        it keeps serving (KeyValueStore.backup)."""
        ...

    def close(self) -> None: ...


class HybridClock:
    """A hybrid logical clock: wall time in ms << 16 | a logical counter, strictly increasing.

    ``lww`` picks the write with the highest timestamp, so timestamps follow real time where
    the wall clock allows and never repeat or go backwards within one process.
    """

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def now(self) -> int:
        wall = (time.time_ns() // 1_000_000) << 16
        with self._lock:
            self._last = max(wall, self._last + 1)
            return self._last

    @staticmethod
    def seconds(timestamp: int) -> float:
        """The wall-clock time (seconds since the epoch) a timestamp of ``now()`` stands for."""
        return (timestamp >> 16) / 1000


# Isolation is a str enum: its members hash and compare like their values, so one dict
# lookup parses both forms (Isolation(...) costs a microsecond on every transaction).
_isolation = enum_decoder(Isolation)


def _parse_isolation(isolation: str | Isolation) -> Isolation:
    try:
        return _isolation(isolation)
    except ValueError:
        choices = ", ".join(repr(i.value) for i in Isolation)
        raise InvalidArgument(f"unknown isolation {isolation!r}; use one of {choices}") from None


def _context_isolation(context: object) -> Isolation:
    """A single write with a context clock resolves a concurrent change with the key's
    resolver (merge); the default resolver ``abort`` turns it into TransactionConflict."""
    return Isolation.SERIALIZABLE if context is None else Isolation.MERGE


def _check_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidValue(f"{what} must be an int, not {type(value).__name__}")
    if not INT64_MIN <= value <= INT64_MAX:
        raise InvalidValue(f"{what} {value} is outside the signed 64-bit range")
    return value


def _clock_bytes(context: VClock | bytes) -> bytes:
    if isinstance(context, VClock):
        return context.encode()
    if isinstance(context, (bytes, bytearray)):
        VClock.decode(bytes(context))  # raise on garbage before it reaches the backend
        return bytes(context)
    raise InvalidArgument(f"context must be a VClock from get_versioned, not {type(context).__name__}")


class _Pending:
    """What a transaction buffered for one key.

    After a put or delete the value is known (``absolute``): later incr/append fold into it
    at once, so a type error shows at the call. Otherwise ``deltas`` holds the incr/append
    ops in order, folded at commit onto whatever is stored then (they commute).
    """

    __slots__ = ("absolute", "value", "deltas")

    def __init__(self, absolute: bool, value: Any, deltas: list[WriteOp]) -> None:
        self.absolute = absolute
        self.value = value  # when absolute: the value, or MISSING after a delete
        self.deltas = deltas


def _own(value: Any) -> Any:
    """A copy of a list (so folding appends never touches a caller's or a stored list)."""
    return list(value) if type(value) is list else value


_OPEN, _COMMITTING, _COMMITTED, _ABORTED = "open", "committing", "committed", "aborted"


def distinct_keys(keys: Iterable[str]) -> list[str]:
    """The keys of a get_many: each once, in the given order, checked (check_key)."""
    wanted = list(dict.fromkeys(keys))
    for key in wanted:
        check_key(key)
    return wanted


def many_keys(keys: Iterable[str], limit: int) -> list[str]:
    """distinct_keys, and TransactionTooLarge past ``limit`` (max_txn_ops): a store's get_many."""
    wanted = distinct_keys(keys)
    if len(wanted) > limit:
        raise TransactionTooLarge(f"get_many of {len(wanted)} keys: at most max_txn_ops ({limit}) at once")
    return wanted


def many_values(keys: list[str], versions: dict[str, Versioned], default: Any) -> dict[str, Any]:
    """What a get_many of ``keys`` returns, from the versions read."""
    return {key: default if (value := versions[key].value) is MISSING else value for key in keys}


class Transaction:
    """A transaction: reads go to the store (and see this transaction's writes), writes are
    buffered until commit, which validates everything the transaction observed.

    Use it as a context manager (``with db.transaction() as tx:``): it commits on a normal
    exit and aborts on an exception. Safe to share between threads, though one thread per
    transaction is the usual way.
    """

    def __init__(
        self, store: KeyValueStore, txid: int, isolation: Isolation, backend: Backend | None = None
    ) -> None:
        self._store = store
        self._backend = store._backend if backend is None else backend
        self.id = txid
        self.isolation = isolation
        self._state = _OPEN
        self._lock = threading.Lock()
        self._reads: dict[str, Versioned] = {}
        self._writes: dict[str, _Pending] = {}
        self._contexts: dict[str, bytes] = {}  # explicit clocks given with put(context=...)
        self._ops = 0
        self._bytes = 0  # of the buffered writes, about (_bytes_with)
        self._key_bytes: dict[str, int] = {}
        # Versions of one moment of the store, taken after this transaction began (transact's
        # rerun of a read-only function): reads of these keys need no validation.
        self._snapshot: dict[str, Versioned] = {}
        self._beyond_snapshot = False  # a read went to the store itself
        self._mark: ReadMark | None = None  # taken at the first read that went to the store

    # --- state ----------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """'open', 'committing', 'committed' or 'aborted'."""
        return self._state

    def _ensure_open(self) -> None:
        self._store._ensure_open()
        if self._state != _OPEN:
            raise TransactionAborted(
                f"transaction {self.id} is already {self._state}; begin a new one"
            )

    def _check_room(self, more: int = 1) -> None:
        """Raise TransactionTooLarge when ``more`` operations would pass max_txn_ops."""
        limit = self._store.max_txn_ops
        if self._ops + more > limit:
            raise TransactionTooLarge(
                f"transaction {self.id} already holds {self._ops} operations; {more} more"
                f" would pass the limit (max_txn_ops) of {limit}"
            )

    def _bytes_with(self, key: str, kind: OpKind, arg: Any, size: int | None) -> tuple[int, int]:
        """(this transaction's bytes, ``key``'s) once ``kind`` of ``arg`` to ``key`` is
        buffered: an upper bound, as codec.size_bound (``size``, when the caller has it: a
        key written again counts its last value, a delta adds to what the key holds).
        TransactionTooLarge past max_txn_bytes."""
        held = self._key_bytes.get(key)
        if kind == OpKind.DELETE:
            mine = len(key)
        else:
            value_bytes = size_bound(arg) if size is None else size
            mine = value_bytes + (len(key) if kind == OpKind.PUT or held is None else held)
        total = self._bytes - (held or 0) + mine
        limit = self._store.max_txn_bytes
        if total > limit:
            raise TransactionTooLarge(
                f"transaction {self.id} would write about {total} bytes of keys and values;"
                f" the limit (max_txn_bytes) is {limit}"
            )
        return total, mine

    def _count_op(self) -> None:
        self._check_room()
        self._ops += 1

    # --- reads ------------------------------------------------------------------------------

    def _observe(self, key: str) -> Versioned:
        """The version this transaction read for key, reading it from the backend once."""
        seen = self._reads.get(key)
        if seen is None:
            self._count_op()
            seen = self._snapshot.get(key)
            if seen is None:
                try:
                    seen = self._backend.read(key, optimistic=True, mark=self._read_mark())
                except BaseException:
                    self._ops -= 1
                    raise
                self._beyond_snapshot = True
            self._reads[key] = seen
        return seen

    def _observe_many(self, keys: list[str]) -> None:
        """Read, in one backend call, every key of ``keys`` whose value this transaction
        does not know yet (what ``_current`` would read one at a time)."""
        wanted = [key for key in keys if key not in self._reads and not self._overwritten(key)]
        if not wanted:
            return
        self._check_room(len(wanted))
        fetch = [key for key in wanted if key not in self._snapshot]
        if fetch:
            self._reads.update(self._backend.read_many(fetch, optimistic=True, mark=self._read_mark()))
            self._beyond_snapshot = True
        self._reads.update((key, self._snapshot[key]) for key in wanted if key in self._snapshot)
        self._ops += len(wanted)

    def _read_mark(self) -> ReadMark | None:
        """The mark the store's reads note against, taken before the first of them."""
        if not self._beyond_snapshot:
            self._mark = self._backend.mark()
        return self._mark

    def _one_moment(self) -> bool:
        """Whether every read went to the store and found a version already current when the
        first began (ReadMark): the reads are one snapshot of that moment."""
        return self._mark is not None and self._mark.before and not self._snapshot

    def _overwritten(self, key: str) -> bool:
        """Whether this transaction put or deleted key: its value no longer needs a read."""
        pending = self._writes.get(key)
        return pending is not None and pending.absolute

    def _current(self, key: str) -> tuple[Any, Versioned | None]:
        check_key(key)
        pending = self._writes.get(key)
        if pending is not None and pending.absolute:
            return _own(pending.value), self._reads.get(key)
        seen = self._observe(key)
        if pending is None:
            return seen.value, seen
        return fold_writes(seen.value, pending.deltas), seen

    def get(self, key: str, default: Any = None) -> Any:
        """The value of key as this transaction sees it, or default when absent."""
        with self._lock:
            self._ensure_open()
            value, _ = self._current(key)
        return default if value is MISSING else _own(value)

    def get_many(self, keys: Iterable[str], default: Any = None) -> dict[str, Any]:
        """{key: its value as this transaction sees it, or default when absent} for every key.

        What get() returns for each key, but the keys this transaction has not read yet are
        fetched together: on a cluster, one request per shard, all at once, rather than a
        round trip per key. The commit validates every one of them, as it does get()'s.
        """
        with self._lock:
            self._ensure_open()
            wanted = distinct_keys(keys)
            self._observe_many(wanted)
            values = [self._current(key)[0] for key in wanted]
        return {key: default if value is MISSING else _own(value) for key, value in zip(wanted, values, strict=True)}

    def get_versioned(self, key: str) -> tuple[Any, VClock]:
        """(value or None, the vector clock of the version this transaction read)."""
        with self._lock:
            self._ensure_open()
            value, seen = self._current(key)
            if seen is None:
                seen = self._observe(key)
        return (None if value is MISSING else value), VClock.decode(seen.clock)

    def __getitem__(self, key: str) -> Any:
        value = self.get(key, MISSING)
        if value is MISSING:
            raise KeyError(key)
        return value

    def __contains__(self, key: str) -> bool:
        return self.get(key, MISSING) is not MISSING

    # --- writes (buffered) --------------------------------------------------------------

    def _buffer(
        self, key: str, kind: OpKind, arg: Any, context: VClock | bytes | None, size: int | None = None
    ) -> None:
        """Buffer one write; ``size``: size_bound(arg) when the caller computed it already."""
        with self._lock:
            self._ensure_open()
            if self._store.read_only:
                raise ReadOnlyStore(
                    f"cannot write {key!r}: the store was opened with read_only=True "
                    "(open it without read_only to write)"
                )
            check_key(key)
            clock = None if context is None else _clock_bytes(context)
            pending = self._writes.get(key)
            # Check everything before changing anything: a failing call must leave the
            # transaction as it was. The op limit goes first because the fold below may
            # extend pending.value in place (it fails, if at all, before touching it).
            self._check_room()
            total, key_bytes = self._bytes_with(key, kind, arg, size)
            if kind == OpKind.PUT:
                new = _Pending(True, _own(arg), [])
            elif kind == OpKind.DELETE:
                new = _Pending(True, MISSING, [])
            else:  # incr or append: a delta, kept as an op unless the value is known
                op = WriteOp(key, kind, arg)
                if pending is None:
                    new = _Pending(False, None, [op])
                elif pending.absolute:
                    # pending.value is this transaction's own copy: folding may extend it
                    # in place.
                    new = _Pending(True, fold_writes(pending.value, (op,), owned=True), [])
                else:
                    new = pending
                    pending.deltas.append(op)
            self._ops += 1
            self._bytes, self._key_bytes[key] = total, key_bytes
            self._writes[key] = new
            if clock is not None:
                self._contexts[key] = clock

    def put(self, key: str, value: Value, *, context: VClock | bytes | None = None) -> None:
        """Buffer a write. With ``context`` (a clock from get_versioned) the write is
        validated against that version: a change since then is a conflict, which under
        isolation="merge" the key's resolver may merge."""
        size = check_value_fits(value, self._store.max_value_bytes)  # InvalidValue / ValueTooLarge now
        self._buffer(key, OpKind.PUT, value, context, size)

    def __setitem__(self, key: str, value: Value) -> None:
        self.put(key, value)

    def delete(self, key: str, *, context: VClock | bytes | None = None) -> None:
        """Buffer a delete (deleting an absent key is not an error)."""
        self._buffer(key, OpKind.DELETE, None, context)

    def __delitem__(self, key: str) -> None:
        self.delete(key)

    def incr(self, key: str, amount: int = 1) -> None:
        """Add amount to an int (an absent key counts as 0). Commutes with other incrs."""
        self._buffer(key, OpKind.INCR, _check_int(amount, "increment"), None)

    def append(self, key: str, item: str | int | bytes) -> None:
        """Append one scalar to a list (an absent key becomes [item]); a str or bytes value
        gets a str or bytes item concatenated. Commutes with other appends and incrs."""
        if isinstance(item, list):
            raise InvalidValue("append takes one str, int or bytes item, not a list")
        check_value_fits([item], self._store.max_value_bytes)
        self._buffer(key, OpKind.APPEND, item, None)

    # --- outcome ------------------------------------------------------------------------

    def _request(self) -> CommitRequest:
        writes = []
        for key, pending in self._writes.items():
            observed = self._context_version(key)
            if pending.absolute:
                if pending.value is MISSING:
                    writes.append(WriteOp(key, OpKind.DELETE, None, observed))
                else:
                    writes.append(WriteOp(key, OpKind.PUT, pending.value, observed))
                continue
            for op in pending.deltas:
                writes.append(op if observed is None else WriteOp(key, op.kind, op.arg, observed))
                observed = None  # one observed version per key is enough
        return CommitRequest(
            txid=self.id,
            coordinator=self._backend.node_id,
            reads=dict(self._reads),  # written keys too: that is their observed version
            writes=tuple(writes),
            isolation=self.isolation,
            timestamp=self._store._clock.now(),
        )

    def _context_version(self, key: str) -> Versioned | None:
        """The version an explicit context clock stands for (None: no context given).

        Only the clock is known for a context, not the value it had, unless this
        transaction read that very version; resolvers then see ``base.value`` as MISSING.
        """
        clock = self._contexts.get(key)
        if clock is None:
            return None
        read = self._reads.get(key)
        if read is not None and read.clock == clock:
            return read
        return Versioned(MISSING, clock)

    def commit(self) -> None:
        """Validate and apply every buffered write atomically; return once durable.

        Raises TransactionConflict (retry), NonResolvableConflict or InvalidOperation; on
        any error nothing of the transaction is applied and it is finished (aborted).
        """
        with self._lock:
            self._ensure_open()
            self._state = _COMMITTING
        outcome = _ABORTED
        try:
            # A transaction with no writes needs no validation when it read one snapshot
            # only (one moment, inside its lifetime: transact's, or versions all current
            # when its first read began), or at most one key without optimism (it is
            # linearized at that read); every other transaction goes to the backend.
            reads = self._reads if self._beyond_snapshot and not self._one_moment() else ()
            backend = self._backend
            if self._writes or len(reads) > 1 or (reads and backend.optimistic_reads):
                backend.commit(self._request())
            outcome = _COMMITTED
        finally:
            self._state = outcome
            self._store._finished(self.id, outcome)

    def _start_from(self, snapshot: dict[str, Versioned]) -> None:
        """Serve this transaction's reads of these keys from ``snapshot``: versions that were
        all current at one moment after the transaction began (Backend.snapshot). A
        transaction that writes nothing and reads only these then commits without
        validation, so it cannot conflict. Private: anything but such a snapshot would let a
        read-only transaction commit what it should not."""
        self._snapshot = snapshot

    def _read_only_keys(self) -> list[str]:
        """The keys a transaction that wrote nothing read; [] when it wrote."""
        return [] if self._writes else list(self._reads)

    def abort(self) -> None:
        """Drop the buffered writes. Aborting a finished transaction raises TransactionAborted."""
        with self._lock:
            self._ensure_open()
            self._state = _ABORTED
        self._store._finished(self.id, _ABORTED)

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._state != _OPEN:
            return  # the body committed or aborted it explicitly
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def __repr__(self) -> str:
        return f"<Transaction {self.id} {self.isolation.value} {self._state}>"


class KeyValueStore:
    """A transactional key-value store: the class both ``pykv.open`` and ``pykv.connect`` return.

    Thread-safe: many threads may run transactions at once. At a glance::

        with db.transaction() as tx:           # commits on exit, aborts on an exception
            tx["b"] = tx.get("a", "0") + "!"
        db.transact(lambda tx: tx.incr("n"))   # reruns the function on TransactionConflict
        txid = db.begin_transaction()          # by id: read/write/delete(txid, ...),
        db.write(txid, "a", 1)                 # commit_transaction / abort_transaction
        db.commit_transaction(txid)
        db.put("k", "v"); db.get("k")          # one-operation transactions
        value, clock = db.get_versioned("k")   # ... later: put("k", v2, context=clock)
        db.scan("prefix/")                     # (key, value) in key order
    """

    def __init__(
        self,
        backend: Backend,
        *,
        max_txn_ops: int = MAX_TXN_OPS,
        max_value_bytes: int = MAX_VALUE_BYTES,
        max_scan_bytes: int = MAX_SCAN_BYTES,
        max_txn_bytes: int = MAX_TXN_BYTES,
        read_only: bool = False,
    ) -> None:
        if max_txn_ops < 1:
            raise InvalidArgument(f"max_txn_ops must be at least 1, not {max_txn_ops}")
        if max_txn_bytes < 1:
            raise InvalidArgument(f"max_txn_bytes must be at least 1, not {max_txn_bytes}")
        if not 1 <= max_value_bytes <= MAX_VALUE_BYTES:
            raise InvalidArgument(f"max_value_bytes must be in 1..{MAX_VALUE_BYTES}")
        if max_scan_bytes < 1:
            raise InvalidArgument(f"max_scan_bytes must be at least 1, not {max_scan_bytes}")
        self._backend = backend
        self.max_txn_ops = max_txn_ops
        self.max_value_bytes = max_value_bytes
        self.max_scan_bytes = max_scan_bytes
        self.max_txn_bytes = max_txn_bytes
        self.read_only = read_only  # pykv.open(path, read_only=True): every write refused
        self._ids = TxnIdSource()
        self._clock = HybridClock()
        self._lock = threading.Lock()
        self._by_id: OpenTransactions[Transaction] = OpenTransactions(Transaction.abort)
        self._closed = False
        self._opened_by: int | None = None  # the parent process, in a forked child
        _OPEN_STORES.add(self)

    @property
    def backend(self) -> Backend:
        """The store behind this API (embedded storage or a cluster client)."""
        return self._backend

    @property
    def closed(self) -> bool:
        """Whether close() was called."""
        return self._closed

    def _ensure_open(self) -> None:
        if self._closed:
            raise StoreClosed("the store is closed; open it again to continue")
        if self._opened_by is not None:
            raise StoreClosed(
                f"this store was opened by process {self._opened_by}, and this process is a fork "
                "of it: open or connect to the store in this process instead (an embedded "
                "store is open in one process at a time: close it in the parent first)"
            )

    # --- transactions -------------------------------------------------------------------

    def transaction(self, isolation: str | Isolation = "serializable") -> Transaction:
        """A new transaction; ``with db.transaction() as tx:`` commits it on exit."""
        return self._transaction(isolation, self._backend)

    def _transaction(self, isolation: str | Isolation, backend: Backend) -> Transaction:
        """A new transaction with this store's ids, clock and limits that reads and commits
        through ``backend`` (pykv.aio gives each transaction a backend of its own)."""
        self._ensure_open()
        return Transaction(self, self._ids.next_id(), _parse_isolation(isolation), backend)

    def transact(
        self,
        fn: Callable[[Transaction], T],
        *,
        retries: int = 16,
        backoff: float = 0.001,
        max_backoff: float = 0.1,
        isolation: str | Isolation = "serializable",
    ) -> T:
        """Run fn(tx) in a transaction and commit, rerunning it on TransactionConflict.

        Retries up to ``retries`` times with exponential backoff and full jitter
        (a random sleep in [0, min(max_backoff, backoff * 2**attempt)]); the last conflict
        is raised when they run out. Returns what fn returned in the attempt that committed.

        When an attempt that wrote nothing conflicts, the next one starts from one snapshot
        of the keys it read (get_many's, Transaction._start_from): a read-only function that
        reads the same keys again then commits however busy they are, where validated
        reads would keep conflicting with the writers.
        """
        attempt = 0
        snapshot_keys: list[str] = []
        while True:
            tx = self.transaction(isolation)
            try:
                if snapshot_keys:
                    tx._start_from(self._backend.snapshot(snapshot_keys))
                result = fn(tx)
                tx.commit()
                return result
            except TransactionConflict:
                if attempt >= retries:
                    raise
                snapshot_keys = tx._read_only_keys()
            finally:
                if tx.state == _OPEN:
                    tx.abort()
            time.sleep(random.uniform(0.0, min(max_backoff, backoff * (2**attempt))))
            attempt += 1

    # --- transactions by id (DESIGN §2) -----------------------------------------------

    def begin_transaction(self, isolation: str | Isolation = "serializable") -> int:
        """Start a transaction and return its id (made locally, no round trip)."""
        tx = self.transaction(isolation)
        self._by_id.add(tx.id, tx)
        return tx.id

    max_open_transactions = OpenTransactions.limit()

    def _lookup(self, txid: int) -> Transaction:
        self._ensure_open()
        return self._by_id.get(txid)

    def _finished(self, txid: int, outcome: str) -> None:
        self._by_id.finished(txid, outcome)

    def read(self, txid: int, key: str, default: Any = None) -> Any:
        """Read key in transaction txid (sees its own writes); default when absent."""
        return self._lookup(txid).get(key, default)

    def write(self, txid: int, key: str, value: Value) -> None:
        """Buffer a write of key in transaction txid."""
        self._lookup(txid).put(key, value)

    def commit_transaction(self, txid: int) -> None:
        """Commit transaction txid (see Transaction.commit); the id is finished afterwards."""
        self._lookup(txid).commit()

    def abort_transaction(self, txid: int) -> None:
        """Abort transaction txid; the id is finished afterwards."""
        self._lookup(txid).abort()

    # --- single-operation transactions -------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """The latest committed value of key (a linearizable read), or default."""
        value, _ = self._read_versioned(key)
        return default if value is MISSING else value

    def get_many(self, keys: Iterable[str], default: Any = None) -> dict[str, Any]:
        """{key: value, or default when absent} for every key (each once, in the given order),
        as one snapshot: the values all held at one moment while the call ran. At most
        max_txn_ops keys (TransactionTooLarge), as a transaction reads.

        Embedded: read while no commit holds one of the keys. On a cluster: reads of every
        key at once (a request per shard), until two such passes agree; when writers keep
        changing the keys, they are locked against writers for one more pass
        (pykv.replica.commitflow.snapshot_rounds). So it never fails
        with a conflict, however busy the keys.
        """
        self._ensure_open()
        wanted = many_keys(keys, self.max_txn_ops)
        return many_values(wanted, self._backend.snapshot(wanted), default)

    def get_versioned(self, key: str) -> tuple[Any, VClock]:
        """(value or None, its vector clock): pass the clock to put(..., context=clock) later."""
        value, clock = self._read_versioned(key)
        return (None if value is MISSING else value), VClock.decode(clock)

    def _read_versioned(self, key: str) -> tuple[Value | object, bytes]:
        self._ensure_open()
        check_key(key)
        seen = self._backend.read(key)
        return seen.value, seen.clock

    def _single(self, fill: Callable[[Transaction], None], isolation: Isolation) -> None:
        tx = self.transaction(isolation)
        fill(tx)
        tx.commit()

    def put(self, key: str, value: Value, *, context: VClock | bytes | None = None) -> None:
        """Write one key. With ``context`` from get_versioned, a concurrent change since that
        version goes to the key's resolver (default: TransactionConflict)."""
        self._single(lambda tx: tx.put(key, value, context=context), _context_isolation(context))

    def delete(
        self, key: str | int, by_id_key: str | None = None, *, context: VClock | bytes | None = None
    ) -> None:
        """Delete one key: ``delete(key)`` as its own transaction, or ``delete(txid, key)``
        inside the transaction begin_transaction() returned (the by-id API)."""
        if by_id_key is not None:
            self._lookup(key).delete(by_id_key, context=context)  # type: ignore[arg-type]
            return
        self._single(
            lambda tx: tx.delete(key, context=context),  # type: ignore[arg-type]
            _context_isolation(context),
        )

    def incr(self, key: str, amount: int = 1) -> None:
        """Add amount to an int key (absent counts as 0) in its own transaction; never conflicts."""
        self._single(lambda tx: tx.incr(key, amount), Isolation.SERIALIZABLE)

    def append(self, key: str, item: str | int | bytes) -> None:
        """Append one item to a list key in its own transaction; never conflicts."""
        self._single(lambda tx: tx.append(key, item), Isolation.SERIALIZABLE)

    def scan(
        self,
        prefix: str = "",
        *,
        start: str | None = None,
        end: str | None = None,
        limit: int | None = None,
        consistent: bool = True,
    ) -> Iterator[tuple[str, Any]]:
        """(key, value) of live keys with the prefix in [start, end), in key order.

        ``consistent`` (the default): one snapshot of the range, across every shard. Each
        value is the one its key held at a single moment, and no key that existed then is
        missing. Embedded, the range is read once, as the caller iterates, from a
        copy-on-write view begun while writing commits into it wait a moment. On a cluster
        it costs at least two passes over the range (pykv.txn.model.ScanPasses); when
        writers changed the range under 3 passes, every shard begins a copy-on-write export of the
        range at one moment and the exports are read (writes into the range are refused,
        KeyLocked, which commits retry for a few milliseconds, only while they begin), see
        pykv.replica.commitflow.scan_rounds. At most ``max_scan_bytes`` (given to open or
        connect, 256 MiB by default) of keys and values are held there: past that the rest is read
        as the caller iterates, from the exports (one lost with its node, or not read for
        30 s, then raises TransactionConflict from the iteration).
        ``consistent=False``: one pass, read as the caller iterates (on a cluster a page of
        about 1 MiB per shard at a time, so any range fits in memory). Each value is a
        committed, durable version, but keys (on a cluster, keys of different pages) may be
        seen at different moments.
        """
        self._ensure_open()
        for bound in (start, end):
            if bound is not None:
                check_key(bound)
        if prefix:
            check_key(prefix)
        if limit is not None and limit < 0:
            raise InvalidArgument(f"limit must be >= 0, not {limit}")
        if consistent:
            items: Iterable[tuple[str, Versioned]] = self._backend.consistent_scan(
                prefix, start, end, limit, self.max_scan_bytes
            )
        else:
            items = self._backend.scan(prefix, start, end, limit)
        return ((key, seen.value) for key, seen in items)

    # --- resolvers ----------------------------------------------------------------------

    def register_resolver(
        self, prefix: str, resolver: str | Callable[[Versioned, Versioned, Versioned], Value]
    ) -> None:
        """Use resolver (a built-in name or a pure function) for keys starting with prefix.
        A built-in name is kept with the data (in the store's files, or on every shard of a
        cluster), so the store applies it after a restart; a function lasts as long as this
        handle (an embedded store only: a cluster refuses it)."""
        self._ensure_open()
        self._backend.resolvers.register(prefix, resolver)

    def resolvers(self) -> dict[str, str]:
        """The registered resolvers, {prefix: name} in prefix order: a built-in's name, or
        (embedded) a function's qualified name. A cluster's, as its shards keep them."""
        self._ensure_open()
        return self._backend.resolvers.names()

    def unregister_resolver(self, prefix: str) -> None:
        """Forget the resolver registered for exactly ``prefix`` (kept ones too): its keys go
        back to a shorter registered prefix's resolver, or the default ``abort``. A prefix
        with none registered is left as it is."""
        self._ensure_open()
        self._backend.resolvers.unregister(prefix)

    # --- lifetime -----------------------------------------------------------------------

    def backup(self, path: str | os.PathLike, progress: Callable[[int, int], None] | None = None) -> None:
        """Copy the store into the new (or empty) directory ``path`` while it keeps serving:
        the copy holds one consistent state, every transaction committed before the call and
        possibly some committed during it, and opens with ``pykv.open(path)``.
        ``progress(bytes done, bytes in all)``. The copy is the same store (the same node id
        in its vector clocks): open it in place of the original, not beside it.
        A cluster client copies every shard as of one moment inside the call into a new
        embedded store (pykv.client.cluster.ClusterBackend.backup), and calls
        ``progress(shards done, shards)``."""
        self._ensure_open()
        self._backend.backup(os.fspath(path), progress)

    def close(self) -> None:
        """Close the store (idempotent); open transactions can no longer commit."""
        if self._opened_by is not None:
            self._closed = True  # the parent's store: its files and threads stay the parent's
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._by_id.clear()
        self._backend.close()

    def __enter__(self) -> KeyValueStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<KeyValueStore {type(self._backend).__name__} {state}>"
