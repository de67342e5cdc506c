"""The embedded store: pykv.open(path), where storage, OCC validation and the public API meet.

Commit pipeline (group commit with strict serializability):

1. Lock the transaction's keys in the engine's LockTable: shared for keys only read,
   exclusive for keys written, all-or-nothing (a commit whose keys are busy waits, holding
   nothing, so there is no deadlock). Commits with disjoint keys proceed side by side.
2. Validate against the current state (DESIGN §3 rules 1–4, pykv.txn.occ.validate), encode
   the new versions, ``storage.submit`` them (one atomic WAL record, visible at once), and
   unlock. While the keys are locked no other commit can change them, so what validation
   saw is still current when the record gets its lsn: each transaction is serialized at
   its submit, and any two that share a key are submitted in the order they validated.
3. ``storage.wait_durable(lsn)`` with nothing locked: every thread waiting there is made
   durable by the same fdatasync (the WAL writer batches them), so N committers share one
   fsync instead of queueing for N.

Submitted versions are visible before they are durable. A reader must never return such a
version (a crash could still lose it), so ``read`` waits until the version it found is
durable; that costs nothing when it already is, which is almost always. A transaction that
validated against a visible-but-not-durable version lands later in the log, so when it is
durable, so is everything it saw.
"""

from __future__ import annotations

import builtins
import contextlib
import itertools
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pykv._engine.locks import LockTable
from pykv.api import KeyValueStore, ReadMark
from pykv.codec import decode_value, encode_value
from pykv.errors import CorruptData, InvalidArgument, InvalidOperation
from pykv.storage.files import (
    RESOLVERS_FILE,
    building_directory,
    refuse_node_directory,
    replace_atomically,
)
from pykv.storage.store import CheckReport, Storage, StoredVersion, Update
from pykv.txn import model
from pykv.txn.model import MISSING, CommitRequest, Versioned, live_items
from pykv.txn.occ import validate
from pykv.txn.resolvers import Resolver, ResolverRegistry
from pykv.txn.views import Imaging
from pykv.types import MAX_SCAN_BYTES, MAX_TXN_BYTES, MAX_TXN_OPS, MAX_VALUE_BYTES

_STORAGE_OPTIONS = (
    "cache_bytes", "fsync", "segment_bytes", "compaction", "progress",
    "compaction_interval", "compaction_min_dead_ratio",
)

# "always": a commit returns once fsync'd (the default and the only policy that keeps every
# acknowledged commit across a power cut); "interval"/"off" trade that for speed.
FSYNC_POLICIES = ("always", "interval", "off")

# A deleted key keeps its clock (the model of pykv.txn: "a deleted key is MISSING with the
# tombstone's clock"), or a re-created key could repeat a clock some transaction observed
# before the delete and validation would accept a stale read (an ABA). Storage keeps that
# tombstone itself: a delete (value None, with the clock validation made) reads back as
# StoredVersion(None, clock, timestamp, lsn).
#
# Stores written before storage kept tombstones stored a delete as this marker value; it is
# still read as a delete (it is no valid encode_value() output: those start with 0x00 or
# 0x01), and never written any more.
_LEGACY_TOMBSTONE = b"\xfe"


def clock_node_id(storage_node_id: int) -> int:
    """The node's entry in vector clocks: clocks hold uint32 node ids, storage makes a 63-bit
    one, so fold it (stable across restarts; never 0, which clocks read as "no node")."""
    folded = (storage_node_id ^ (storage_node_id >> 32)) & 0xFFFFFFFF
    return folded or 1


def _versioned(stored: StoredVersion) -> Versioned:
    value = stored.value
    if value is None or value == _LEGACY_TOMBSTONE:
        return Versioned(MISSING, stored.clock, stored.timestamp)
    return Versioned(decode_value(value), stored.clock, stored.timestamp)


class _CurrentState:
    """The StateView validation reads: the latest applied version of each key, decoded."""

    __slots__ = ("_storage",)

    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    def get(self, key: str) -> Versioned:
        return _versioned(self._storage.get(key.encode("utf-8")))

    def stamp_of(self, key: str) -> tuple[bytes, int]:
        return self._storage.stamp_of(key.encode("utf-8"))


class _KeyLocks:
    """The keys of in-flight commits, in the engine's LockTable; a busy key makes the commit wait.

    A committing transaction holds every key it read (shared) and wrote (exclusive) from
    validation until its versions are submitted, all-or-nothing (no hold-and-wait, so no
    deadlock). Commits with disjoint keys then validate and submit side by side, e.g. one
    reading a value from disk while another fills the WAL buffer.
    """

    def __init__(self) -> None:
        self._table = LockTable()  # thread-safe on its own
        self._changed = threading.Condition(threading.Lock())
        self._owners = itertools.count(1)
        self._waiting = 0  # threads in acquire's slow path; changed under _changed

    def acquire(self, shared: list[bytes], exclusive: list[bytes]) -> int:
        owner = next(self._owners)
        if self._table.try_lock_all(shared, exclusive, owner):
            return owner  # the common case: free keys, no condition lock, nothing to wake
        with self._changed:
            # Counted BEFORE the retry: a release that does not see this count happened
            # before the retry, which then succeeds, so no wake-up is ever lost.
            self._waiting += 1
            try:
                while not self._table.try_lock_all(shared, exclusive, owner):
                    self._changed.wait()
            finally:
                self._waiting -= 1
        return owner

    def release(self, owner: int) -> None:
        self._table.release_all(owner)
        if self._waiting:
            with self._changed:
                self._changed.notify_all()


class _ScanGate:
    """Lets a consistent scan keep writers out of its range while its view begins
    (consistent_scan).

    Writing commits pass through it (``enter``/``leave``) around validate-and-submit, with
    the keys they write; ``closed(key_range)`` waits until no commit inside writes a key
    of the range, keeps new ones that would out meanwhile (a scan waiting goes first, so
    steady commits cannot starve it), and lets them in again at the end. Commits writing
    only elsewhere never wait.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition(threading.Lock())
        self._inside: dict[int, list[str]] = {}  # commits between enter and leave: what they write
        self._tickets = itertools.count()
        self._ranges: list[model.KeyRange] = []  # of scans waiting for the gate or holding it

    def enter(self, written: list[str]) -> int:
        """Wait while a scan holds (or waits for) a range with a written key; a ticket.

        No lock while no scan holds or waits for a range (the common case): a commit counts
        itself inside first and looks for scans after, and a scan adds its range first and
        looks for commits inside after, so one of the two always sees the other (each step
        is atomic under the GIL). Eight committing threads queueing for the condition's lock
        instead each paid a GIL hand-over per commit.
        """
        ticket = next(self._tickets)
        self._inside[ticket] = written
        if not self._ranges:
            return ticket
        del self._inside[ticket]  # a scan looks: wait for it as the lock's holder
        with self._changed:
            self._changed.notify_all()  # a scan may have seen this commit inside
            while self._ranges and _writes_into(written, self._ranges):
                self._changed.wait()
            self._inside[ticket] = written
            return ticket

    def leave(self, ticket: int) -> None:
        del self._inside[ticket]
        if self._ranges:
            with self._changed:
                self._changed.notify_all()

    @contextlib.contextmanager
    def closed(self, key_range: model.KeyRange) -> Iterator[None]:
        with self._changed:
            self._ranges.append(key_range)
            # A copy: commits count themselves in and out without the lock (enter).
            while any(_writes_into(written, [key_range]) for written in list(self._inside.values())):
                self._changed.wait()
        try:
            yield
        finally:
            with self._changed:
                self._ranges.remove(key_range)
                self._changed.notify_all()


def _writes_into(written: list[str], ranges: list[model.KeyRange]) -> bool:
    return any(r.holds(key) for r in ranges for key in written)


class _View:
    """One consistent scan's copy-on-write view, and the lock that orders the commits
    keeping versions for it against its reader's steps (other threads)."""

    __slots__ = ("imaging", "key_range", "lock")

    def __init__(self, key_range: model.KeyRange) -> None:
        self.imaging = Imaging(key_range)
        self.key_range = key_range
        self.lock = threading.Lock()


class _Views:
    """The copy-on-write views (pykv.txn.views.Imaging) that consistent scans are reading.

    A commit calls ``keep`` with its updates before it submits them, so each view whose
    range they write into keeps the version of then of a key it has not passed yet; commits
    writing elsewhere, and the readers of other views, never wait for a view's lock.
    """

    def __init__(self) -> None:
        self._views: list[_View] = []  # replaced, never changed in place: keep() reads it unlocked
        self._changing = threading.Lock()  # one add or removal at a time

    def __len__(self) -> int:
        return len(self._views)

    def keep(self, state: _CurrentState, updates: list) -> None:
        # (A view added after this read began after the caller's gate: none of its keys.)
        for view in self._views:
            if any(view.key_range.holds(u.key) for u in updates):
                with view.lock:
                    view.imaging.keep(state, updates)

    def add(self, key_range: model.KeyRange) -> _View:
        view = _View(key_range)
        with self._changing:
            self._views = [*self._views, view]
        return view

    def read(self, view: _View, live: Iterator[tuple[str, Versioned]]) -> Iterator[tuple[str, Versioned]]:
        """The view's versions (deleted keys left out), a step at a time under its lock; the
        view ends with the iteration (read to its end, or closed)."""
        walk = view.imaging.walk(live)
        try:
            while True:
                with view.lock:
                    item = next(walk, None)
                if item is None:
                    return
                if item[1].exists:
                    yield item
        finally:
            with self._changing:
                self._views = [v for v in self._views if v is not view]


class StoredResolvers(ResolverRegistry):
    """The resolvers of an embedded store: built-in names are kept in the store's RESOLVERS
    file ({prefix: name}, replaced atomically), so that the store applies them again when
    opened (as a cluster keeps them in its shards); a function lasts as long as the handle
    that registered it. A cluster backup keeps the cluster's in the same file."""

    def __init__(self, storage: Storage) -> None:
        super().__init__()
        self._storage = storage
        self._names = kept_resolvers(storage.path)  # CorruptData for a damaged file
        self._saving = threading.Lock()
        for prefix, name in self._names.items():
            try:
                super().register(prefix, name)
            except InvalidOperation as exc:  # a name this release does not know
                raise CorruptData(f"{os.path.join(storage.path, RESOLVERS_FILE)}: {exc}{_RESOLVERS_FIX}") from None

    def register(self, prefix: str, resolver: str | Resolver) -> None:
        super().register(prefix, resolver)  # validates the prefix and the name
        if isinstance(resolver, str):
            self._save(prefix, resolver)
        else:
            self._save(prefix, None)  # the function replaces a kept name, after a restart too

    def unregister(self, prefix: str) -> None:
        super().unregister(prefix)
        self._save(prefix, None)

    def _save(self, prefix: str, name: str | None) -> None:
        with self._saving:
            if self._names.get(prefix) == name or self._storage.read_only:
                return  # (read-only: registered for this handle only; the files stay as they are)
            names = {**self._names, prefix: name} if name is not None else {
                p: n for p, n in self._names.items() if p != prefix}
            keep_resolvers(self._storage.path, names)
            self._names = names


class EmbeddedBackend:
    """The Backend of pykv.api over one local Storage directory."""

    def __init__(self, storage: Storage, *, max_value_bytes: int = MAX_VALUE_BYTES,
                 max_txn_ops: int = MAX_TXN_OPS) -> None:
        self._storage = storage
        self._max_txn_ops = max_txn_ops
        self._state = _CurrentState(storage)
        self._locks = _KeyLocks()
        self._gate = _ScanGate()
        self._views = _Views()
        self._max_value_bytes = max_value_bytes
        self.node_id: int = clock_node_id(storage.node_id())
        self.resolvers = StoredResolvers(storage)

    @property
    def storage(self) -> Storage:
        return self._storage

    optimistic_reads = False  # every read is of the latest durable version

    def mark(self) -> ReadMark:
        """The last lsn applied as the horizon (Storage.applied_lsn): every record up to it
        is seen by every later read, so a version a read returns at or before it was current
        then (and it was taken after the transaction began)."""
        return ReadMark(self._storage.applied_lsn)

    def read(self, key: str, *, optimistic: bool = False, mark: ReadMark | None = None) -> Versioned:
        stored = self._storage.get(key.encode("utf-8"))
        if mark is not None and stored.lsn > mark.horizon:
            mark.before = False
        return self._durable(stored)

    def read_many(
        self, keys: list[str], *, optimistic: bool = False, mark: ReadMark | None = None
    ) -> dict[str, Versioned]:
        stored = {key: self._storage.get(key.encode("utf-8")) for key in keys}
        if mark is not None and any(version.lsn > mark.horizon for version in stored.values()):
            mark.before = False
        return self._all_durable(stored)

    def snapshot(self, keys: list[str]) -> dict[str, Versioned]:
        """One snapshot of keys: read while no commit holds any of them (shared locks, as a
        commit takes for what it read), so none is seen half-way through a commit."""
        encoded = [key.encode("utf-8") for key in keys]
        owner = self._locks.acquire(encoded, [])
        try:
            stored = {key: self._storage.get(raw) for key, raw in zip(keys, encoded, strict=True)}
        finally:
            self._locks.release(owner)
        return self._all_durable(stored)

    def _all_durable(self, stored: dict[str, StoredVersion]) -> dict[str, Versioned]:
        """The versions, once all are durable (one wait for the newest)."""
        newest = max((version.lsn for version in stored.values()), default=0)
        if newest > self._storage.durable_lsn:
            self._storage.wait_durable(newest)
        return {key: _versioned(version) for key, version in stored.items()}

    def _durable(self, stored: StoredVersion) -> Versioned:
        """stored, once it is durable: never show a version a crash could undo."""
        if stored.lsn > self._storage.durable_lsn:
            self._storage.wait_durable(stored.lsn)
        return _versioned(stored)

    def check(self, progress: Callable[[int], None] | None = None) -> CheckReport:
        """Read and decode every live value (``pykv check``): the keys whose value fails its
        checksum or does not decode, each with why. The store keeps serving meanwhile."""
        return self._storage.check(_versioned, progress)

    def commit(self, request: CommitRequest) -> None:
        written = request.written_keys()
        exclusive = [key.encode("utf-8") for key in written]
        shared = [key.encode("utf-8") for key in request.reads if key not in written]
        ticket = self._gate.enter(written) if written else None
        try:
            owner = self._locks.acquire(shared, exclusive)
            try:
                lsn = self._validate_and_submit(request)
            finally:
                self._locks.release(owner)  # the new versions are visible: later commits see them
        finally:
            if ticket is not None:
                self._gate.leave(ticket)
        if lsn:
            self._storage.wait_durable(lsn)  # no lock held: the waiters share one fsync

    def _validate_and_submit(self, request: CommitRequest) -> int:
        updates = validate(request, self._state, self.resolvers, max_ops=self._max_txn_ops)
        self._views.keep(self._state, updates)  # (an update that fails below changes nothing)
        # Encode everything before submitting anything: a value that breaks a limit
        # (e.g. an append that grows a list past 1 MiB) fails the whole transaction.
        limit = self._max_value_bytes
        batch = [
            Update(u.key.encode("utf-8"),
                   None if u.value is MISSING else encode_value(u.value, limit),
                   u.clock, u.timestamp)
            for u in updates
        ]
        if not batch:
            return 0  # a read-only transaction: validated, nothing to make durable
        return self._storage.submit(batch, wake=False)  # commit() waits for it next

    def scan(
        self, prefix: str, start: str | None, end: str | None, limit: int | None,
        deleted: bool = False,
    ) -> Iterator[tuple[str, Versioned]]:
        every = ((key, self._durable(stored)) for key, stored in self._stored(model.KeyRange(prefix, start, end)))
        return live_items(every, limit, deleted)  # lazy: the storage walks its index a batch at a time

    def _stored(self, key_range: model.KeyRange, deleted: bool = False) -> Iterator[tuple[str, StoredVersion]]:
        """Storage.scan of ``key_range`` (keys decoded), tombstones too with ``deleted``."""
        prefix, start, end = (None if bound is None else bound.encode("utf-8") for bound in key_range)
        for raw, stored in self._storage.scan(prefix or b"", start, end, deleted=deleted):
            yield raw.decode("utf-8"), stored

    def consistent_scan(
        self, prefix: str, start: str | None, end: str | None, limit: int | None,
        max_bytes: int = MAX_SCAN_BYTES,
    ) -> Iterator[tuple[str, Versioned]]:
        """The range as the caller iterates, from a copy-on-write view (_Views) begun while no
        commit writes into the range (_ScanGate) and all it shows is durable: the range at
        that moment, in one pass, holding nothing (``max_bytes`` is not needed). Cheaper
        than passes that agree (a cluster's way, where a view costs lock rounds): one read
        of the range instead of two or more, while writers into the range keep the version
        of each key it has not passed yet."""
        return live_items(self._viewed(model.KeyRange(prefix, start, end)), limit, deleted=False)

    def _viewed(self, key_range: model.KeyRange) -> Iterator[tuple[str, Versioned]]:
        with self._gate.closed(key_range):
            self._storage.wait_durable(self._storage.last_lsn)
            view = self._views.add(key_range)
        # Deleted keys too: a key deleted since the view began comes in its place in key order.
        every = ((key, _versioned(stored)) for key, stored in self._stored(key_range, deleted=True))
        yield from self._views.read(view, every)

    def stats(self) -> dict[str, Any]:
        return self._storage.stats()

    def backup(self, target: str, progress: Callable[[int, int], None] | None = None) -> None:
        self._storage.backup(target, progress)

    def close(self) -> None:
        # A commit racing with close fails with StoreClosed from storage; submit is atomic,
        # so it never leaves half a transaction behind.
        self._storage.close()


class StoreLoader:
    """Writes versions another store committed, their clocks and timestamps kept, into a new
    embedded store (what a cluster backup writes): see ``store_loader``."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    def keep_resolvers(self, names: dict[str, str]) -> None:
        """Keep the cluster's resolvers ({prefix: built-in name}) beside the keys: the
        store opened with pykv.open applies them (StoredResolvers), `pykv restore` registers
        them again on the cluster it loads."""
        keep_resolvers(self._storage.path, names)

    def add(self, items: list[tuple[str, Versioned]]) -> None:
        """Write live versions (a page of an export)."""
        batch = [Update(key.encode("utf-8"), encode_value(version.value), version.clock, version.timestamp)
                 for key, version in items]
        if batch:
            self._storage.submit(batch)


@contextlib.contextmanager
def store_loader(path: str, what: str) -> Iterator[StoreLoader]:
    """A StoreLoader of a new store built beside ``path``; when the block ends the store is
    made durable and takes the place of ``path`` (which must be absent or empty: else
    InvalidArgument), and when it raises nothing is left at ``path``."""
    with building_directory(path, what) as building:
        storage = Storage.open(building)
        try:
            yield StoreLoader(storage)
            storage.sync()
        finally:
            storage.close()


def keep_resolvers(path: str | Path, names: dict[str, str]) -> None:
    """Replace the resolvers the store in ``path`` keeps ({prefix: built-in name}), atomically."""
    replace_atomically(os.path.join(path, RESOLVERS_FILE), json.dumps(names, sort_keys=True).encode())


def kept_resolvers(path: str | Path) -> dict[str, str]:
    """The resolvers the store (or cluster backup) in ``path`` keeps ({prefix: built-in
    name}); {} for one that has none."""
    file = os.path.join(path, RESOLVERS_FILE)
    try:
        with builtins.open(file, "rb") as f:
            names = json.loads(f.read())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise CorruptData(f"{file} does not hold resolvers: {exc}{_RESOLVERS_FIX}") from None
    if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
        raise CorruptData(f"{file} does not hold {{prefix: name}}{_RESOLVERS_FIX}")
    return names


_RESOLVERS_FIX = (" (a JSON object of key prefixes and built-in resolver names; without the file"
                  " the store opens with no resolver registered)")


def open(  # noqa: A001 - pykv.open mirrors the builtin on purpose, like sqlite3.connect/lmdb.open
    path: str | Path,
    *,
    max_txn_ops: int = MAX_TXN_OPS,
    max_value_bytes: int = MAX_VALUE_BYTES,
    max_scan_bytes: int = MAX_SCAN_BYTES,
    max_txn_bytes: int = MAX_TXN_BYTES,
    read_only: bool = False,
    **storage_options: Any,
) -> KeyValueStore:
    """Open (creating if needed) the embedded store in directory ``path``.

    ``read_only=True`` opens an existing store without changing any of its files (a backup, a
    copy on read-only media): reads, scans and backups work, every write raises
    ReadOnlyStore, and other processes may open it read-only at the same time (but not to
    write: StoreLocked either way).

    Options: ``cache_bytes`` (read cache size, default 64 MiB), ``fsync`` ("always": a commit
    returns only once fsync'd), ``segment_bytes`` (value-log file size), ``compaction``
    (background compaction on/off), ``progress`` (callback during recovery), ``max_txn_ops``,
    ``max_txn_bytes`` and ``max_value_bytes`` (limits), and ``max_scan_bytes``, which a
    cluster's consistent scans hold at most (the embedded store's hold nothing: accepted so
    that the same options fit both). Raises StoreLocked when another process has it open.
    """
    unknown = sorted(set(storage_options) - set(_STORAGE_OPTIONS))
    if unknown:
        known = ", ".join(("max_txn_ops", "max_txn_bytes", "max_value_bytes", "max_scan_bytes",
                           "read_only", *_STORAGE_OPTIONS))
        raise InvalidArgument(f"unknown option(s) {', '.join(unknown)} for pykv.open; known: {known}")
    fsync = storage_options.get("fsync", "always")
    if fsync not in FSYNC_POLICIES:
        raise InvalidArgument(f"fsync must be one of {', '.join(FSYNC_POLICIES)}, not {fsync!r}")
    refuse_node_directory(str(path))
    try:
        storage = Storage.open(str(path), read_only=read_only, **storage_options)
    except CorruptData as exc:
        raise CorruptData(f"{exc}. To copy the store without its damaged records (losing their "
                          f"transactions, keeping the rest): pykv salvage {path} NEW_DIR") from None
    try:
        backend = EmbeddedBackend(storage, max_value_bytes=max_value_bytes,
                                  max_txn_ops=max_txn_ops)
        return KeyValueStore(backend, max_txn_ops=max_txn_ops, max_value_bytes=max_value_bytes,
                             max_scan_bytes=max_scan_bytes, max_txn_bytes=max_txn_bytes,
                             read_only=read_only)
    except BaseException:
        storage.close()
        raise
