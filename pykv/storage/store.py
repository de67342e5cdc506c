"""Storage: a node's durable key-value state, bitcask on the group-commit WAL (DESIGN §5).

The WAL IS the value log. A commit is one WAL record (see record.py) holding every update of
a transaction, so it is atomic by construction and costs one write plus a share of one
fdatasync (group commit in the Cython writer). The key directory (the Cython KeyDir) maps each
live key to where its value bytes sit in a segment file, with the version's clock, timestamp
and lsn, so a read is a cache hit or one ``os.pread``. A SortedList of the keys next to it
makes ordered scans cheap. A hint file (hint.py) checkpoints the key directory so restart
replays only the WAL after it; compaction (compaction.py) rewrites the oldest segments.

Ordering contract — read this before building on Storage:
- ``submit`` appends the record and applies it to the key directory at once, under one lock:
  the new version is visible to ``get`` BEFORE it is durable. (The WAL writer thread is
  woken only after that lock is released, so it never preempts a thread holding it.) A caller that must not expose
  undurable data (the embedded store, a Raft apply loop) waits with ``wait_durable(lsn)``
  before acknowledging, and decides itself what readers may see meanwhile.
- lsns are assigned in submit order under that lock, so the key directory reflects the WAL in
  lsn order, and recovery (replay in lsn order) rebuilds exactly the same state.
- A version that was submitted but not yet written to its segment is served from memory
  (``_pending``) until its record is durable, so a read never touches unwritten file bytes.

Deleted keys keep their clock: a delete that carries a clock leaves a TOMBSTONE in the key
directory (segment id 0, no value bytes; its meta holds the timestamp and the clock), so
``get`` returns ``StoredVersion(None, clock, timestamp, lsn)`` and a re-created key continues
from that clock instead of restarting from the empty one (which could repeat a clock some
reader observed before the delete). Tombstones are checkpointed in the hint like any entry
and are never dropped, by compaction or otherwise: the simplest choice that is always
correct, at a memory cost of one key directory entry (~50 bytes + key + clock) and one key in
the sorted index (~42 bytes + key) per deleted key, forever; ``stats()["tombstones"]`` counts
them. A delete with an EMPTY clock has nothing to remember and removes the key entirely
(``get`` returns ABSENT), as before. Scans skip tombstones.

Recovery and truncation invariant: WAL records with lsn >= the hint's checkpoint lsn are never
deleted, and a hint is renamed into place only after every record its entries point at is
durable. Hence hint + WAL replay always rebuilds every acknowledged update, and recovery can
tell a torn tail (records after the checkpoint cut) from lost data (the checkpoint's own
record gone), which raises CorruptData instead of opening a store that silently forgot.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice

from sortedcontainers import SortedList

from pykv._engine.keydir import KeyDir
from pykv._engine.wal import WalWriter, crc32c, read_wal, segment_path
from pykv.errors import (
    CorruptData,
    InvalidArgument,
    InvalidKey,
    InvalidValue,
    KeyTooLarge,
    LimitError,
    ReadOnlyStore,
    StoreClosed,
)
from pykv.storage import record
from pykv.storage.cache import ByteLRU, SharedCache
from pykv.storage.compaction import CompactionStats, SegmentUsage, choose_prefix
from pykv.storage.failpoints import failpoint
from pykv.storage.files import (
    RESOLVERS_FILE,
    DirectoryLock,
    copy_durably,
    load_node_id,
    load_or_create_node_id,
    make_dirs_durably,
    new_store_directory,
)
from pykv.storage.frozen import FrozenLog
from pykv.storage.hint import read_hint, write_hint
from pykv.storage.maintenance import Maintainer
from pykv.storage.segfiles import SegmentFiles
from pykv.storage.walk import key_batches
from pykv.types import MAX_KEY_BYTES

Progress = Callable[[str, int, int], None]

FRAME_BYTES = 8  # [u32 len][u32 crc] before every WAL payload
MAX_TIMESTAMP = (1 << 64) - 1
# The key directory keeps at most 1024 clock bytes per key; meta takes 12 of them.
MAX_CLOCK_BYTES = 1024 - record.META_FIXED_BYTES
SCAN_BATCH = 256  # keys fetched from the sorted index per lock acquisition
CHECKPOINT_BATCH = 4096  # key directory entries copied per lock acquisition
RELOCATE_BATCH_BYTES = 4 << 20  # live bytes copied forward per relocation record
# Bytes of one key in the SortedList beyond its length: the bytes object header (33), the
# list slot (8) and SortedList's index share (<1); measured by benchmarks/bench_storage.py
# (54 B per 13-byte key). Reported as stats()["key_index_bytes"].
KEY_INDEX_OVERHEAD = 42


@dataclass(slots=True, unsafe_hash=True)  # not frozen, for speed: see pykv.types
class StoredVersion:
    """One version of a key as stored: encoded value (None = absent), clock, timestamp, lsn."""

    value: bytes | None
    clock: bytes
    timestamp: int
    lsn: int


@dataclass(slots=True, unsafe_hash=True)  # not frozen, for speed: see pykv.types
class Update:
    """One key update of a commit; value None deletes the key."""

    key: bytes
    value: bytes | None
    clock: bytes
    timestamp: int


ABSENT = StoredVersion(None, b"", 0, 0)


@dataclass
class CheckReport:
    """What check() found: how many keys with a value it read, and the damaged ones with why."""

    keys: int = 0
    damaged: list[tuple[str, str]] = field(default_factory=list)


CHECK_PROGRESS_EVERY = 1000

# The key directory's segment id of a tombstone (no segment has id 0: lsns start at 1).
TOMBSTONE_SEGMENT = 0
META_FIXED = record.META_FIXED_BYTES
_timestamp_of = struct.Struct("<Q").unpack_from  # the timestamp at the start of meta


def _stored(value: bytes | None, meta: bytes, lsn: int) -> StoredVersion:
    """The version of a key directory entry's metadata, with its value (None: deleted)."""
    return StoredVersion(value, meta[META_FIXED:], _timestamp_of(meta)[0], lsn)


def _wake_writer(wal: WalWriter | None) -> None:
    """Wake the WAL writer for records appended under _lock (after letting go of it)."""
    if wal is not None:
        wal.wake()


class Storage:
    """The durable, node-local key-value state: get/submit/commit, scan, checkpoint, compact.

    Thread-safe. Build it with ``Storage.open(path)``; the constructor is internal.
    """

    def __init__(self, path: str, dir_lock: DirectoryLock, *, cache: ByteLRU, fsync: str,
                 segment_bytes: int, compaction: bool, compaction_interval: float,
                 compaction_min_dead_ratio: float, maintainer: Maintainer | None,
                 checkpoint_bytes: int | None = None, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        self._wal_dir = os.path.join(path, "wal")
        self._hint_path = os.path.join(path, "hint")
        self._dir_lock = dir_lock
        # A read-only store never commits, so never stamps a clock: a missing id stays 0.
        self._node_id = (load_node_id(path) or 0) if read_only else load_or_create_node_id(path)
        self._fsync = fsync
        self._segment_bytes = segment_bytes
        # WAL bytes after which the background work writes a checkpoint: what a reopen replays.
        self._checkpoint_bytes = checkpoint_bytes or segment_bytes
        self._lock = threading.Lock()  # key directory, index, cache, pending, segment tables
        self._maintenance = threading.Lock()  # one checkpoint or compaction at a time
        self._keydir = KeyDir()
        self._keys = SortedList()
        self._key_bytes = 0  # sum of key lengths in the index
        self._tombstones = 0  # key directory entries of deleted keys (kept for their clock)
        self._cache = cache
        # Whether written values go into the read cache. A replica that serves no reads (a
        # follower's shard) turns it off: its writes would only push out the values of
        # shards that do. It still refreshes the keys cached already (its own increments and
        # appends read them back). A cached value is found only at its lsn, so none goes stale.
        self.cache_writes = True
        # key -> (version lsn, value, record lsn) for versions whose record may be unwritten
        self._pending: dict[bytes, tuple[int, bytes, int]] = {}
        # (record lsn, its keys, whether its values go into the cache once written)
        self._pending_order: deque[tuple[int, list[bytes], bool]] = deque()
        self._seg_live: defaultdict[int, int] = defaultdict(int)
        self._seg_total: defaultdict[int, int] = defaultdict(int)
        self._files = SegmentFiles(lambda seg: segment_path(self._wal_dir, seg))
        self._checkpoint_lsn = 0
        self._applied_lsn = 0  # see applied_lsn
        self._bytes_since_checkpoint = 0
        self._compactions = 0
        self._background_error: BaseException | None = None
        self._closed = False
        self._wal: WalWriter | FrozenLog | None = None
        self._compaction_interval = compaction_interval
        self._compaction_min_dead_ratio = compaction_min_dead_ratio
        self._stop = threading.Event()
        self._progress: Progress | None = None
        self._thread: threading.Thread | None = None
        # Compaction and checkpoints: by a shared Maintainer's thread, or by one of our own.
        self._maintainer = maintainer if compaction else None
        if compaction and maintainer is None:
            self._thread = threading.Thread(target=self._background, name=f"pykv-storage-bg {path}",
                                            daemon=True)

    # --- opening and recovery -------------------------------------------------------------

    @classmethod
    def open(cls, path: str, *, cache_bytes: int = 64 << 20, fsync: str = "always",
             segment_bytes: int = 64 << 20, compaction: bool = True,
             progress: Progress | None = None, compaction_interval: float = 1.0,
             compaction_min_dead_ratio: float = 0.5, cache: SharedCache | None = None,
             maintainer: Maintainer | None = None, checkpoint_bytes: int | None = None,
             read_only: bool = False) -> Storage:
        """Open (creating if needed) the store at path, recovering from the hint and the WAL.

        Takes an exclusive lock on ``path/LOCK`` (StoreLocked if another Storage holds it),
        loads the latest hint file, replays the WAL records after it and cuts a torn tail.
        ``progress(phase, done, total)`` is called during recovery ("hint", "replay") and
        background compactions ("compact", bytes copied, live bytes to copy; called from the
        compaction thread); total is 0 while unknown. ``fsync`` is the WAL policy: "always", "interval" or "off".
        The read cache holds ``cache_bytes``, or, given a ``cache``, shares that budget with
        the other stores that use it (a node's shards); likewise compaction runs on a thread of
        its own, or on a shared ``maintainer``'s. It writes a checkpoint every
        ``checkpoint_bytes`` of WAL (default: ``segment_bytes``), which bounds what a reopen replays.

        ``read_only=True`` opens an existing store without changing a byte of it (a backup, a
        store on read-only media, one being inspected): a shared lock, so other read-only
        opens may share it but no writer, no compaction, no checkpoint, a torn tail left in
        place, and every write refused with ReadOnlyStore.
        """
        if fsync not in ("always", "interval", "off"):
            raise ValueError(f"fsync must be 'always', 'interval' or 'off', not {fsync!r}")
        if read_only:
            _refuse_unless_store(path)
        else:
            make_dirs_durably(path)
        dir_lock = DirectoryLock(path, shared=read_only)
        try:
            view = ByteLRU(cache_bytes) if cache is None else cache.view()
            store = cls(path, dir_lock, cache=view, fsync=fsync,
                        segment_bytes=segment_bytes, compaction=compaction and not read_only,
                        compaction_interval=compaction_interval,
                        compaction_min_dead_ratio=compaction_min_dead_ratio,
                        maintainer=maintainer, checkpoint_bytes=checkpoint_bytes,
                        read_only=read_only)
            store._progress = progress
            store._recover(progress)
        except BaseException:
            dir_lock.release()
            raise
        if store._thread is not None:
            store._thread.start()
        if store._maintainer is not None:
            store._maintainer.add(store)
        return store

    def _recover(self, progress: Progress | None) -> None:
        if not self.read_only:
            make_dirs_durably(self._wal_dir)
            # a checkpoint that crashed before its rename; the hint it would replace is intact
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._hint_path + ".tmp")
        hint = read_hint(self._hint_path)
        if hint is not None:
            self._checkpoint_lsn, entries = hint
            self._load_hint_entries(entries, progress)
        self._replay(self._checkpoint_lsn, progress)
        next_lsn = max(self._checkpoint_lsn, self._replayed_lsn) + 1
        if self.read_only:
            self._wal = FrozenLog(self._wal_dir, next_lsn - 1, self._replayed_tail)
        else:
            self._wal = self._writer(next_lsn)
        if self._wal.last_lsn < self._checkpoint_lsn:
            raise CorruptData(f"the WAL ends at lsn {self._wal.last_lsn} but the hint covers "
                              f"up to {self._checkpoint_lsn}: acknowledged records are missing")
        self._applied_lsn = self._wal.last_lsn
        segments = set(self._wal.segments())
        missing = sorted(s for s, live in self._seg_live.items() if live and s not in segments)
        if missing:
            raise CorruptData(f"live values point into missing WAL segments {missing}")
        self._seg_total.update(self._wal.segment_sizes())

    def _writer(self, next_lsn: int) -> WalWriter:
        """The WAL writer, which cuts a torn tail and goes on at ``next_lsn``."""
        try:
            return WalWriter(self._wal_dir, segment_bytes=self._segment_bytes,
                             fsync=self._fsync, start_lsn=next_lsn,
                             preallocate=self._fsync == "always")
        except ValueError as exc:  # the log does not continue where the hint + replay ended
            raise CorruptData(f"{self._wal_dir}: {exc}") from exc

    def _load_hint_entries(self, entries, progress: Progress | None) -> None:
        keys = []
        put = self._keydir.put
        for n, (key, seg, off, size, meta, lsn) in enumerate(entries, 1):
            put(key, seg, off, size, meta, lsn)
            keys.append(key)
            if seg == TOMBSTONE_SEGMENT:
                self._tombstones += 1
            else:
                self._seg_live[seg] += size
            self._key_bytes += len(key)
            if progress is not None and n % 65536 == 0:
                progress("hint", n, 0)
        self._keys = SortedList(keys)  # the hint is in key order, so this sort is linear
        if progress is not None:
            progress("hint", len(keys), len(keys))

    def _replay(self, checkpoint_lsn: int, progress: Progress | None) -> None:
        """Apply the WAL records after the checkpoint, reading without repairing anything.

        The record AT the checkpoint lsn must still be there: a torn tail may only cut
        records after it (they were never acknowledged if the tail is torn), and a log that
        ends before it lost acknowledged, checkpointed data. That is checked before the
        WalWriter opens, because opening it repairs (truncates) the tail.
        """
        expected = max(checkpoint_lsn, 1)
        done = 0
        self._replayed_tail: tuple[int, int] | None = None  # just past the last whole record
        for rec in read_wal(self._wal_dir, repair=False, from_lsn=expected):
            if rec.lsn != expected:
                raise CorruptData(f"WAL replay expected lsn {expected} but found {rec.lsn}")
            expected += 1
            self._replayed_tail = (rec.segment_id, rec.offset + len(rec.payload))
            if rec.lsn <= checkpoint_lsn:
                continue  # the hint already holds it
            kind, entries = record.decode(rec.payload)
            self._note_record(rec.segment_id, len(rec.payload))
            self._apply(kind, entries, rec.segment_id, rec.offset, rec.lsn)
            done += 1
            if progress is not None and done % 4096 == 0:
                progress("replay", done, 0)
        if expected <= checkpoint_lsn:
            raise CorruptData(f"the WAL in {self._wal_dir} ends before lsn {checkpoint_lsn}, "
                              "which the hint file covers: acknowledged records are missing")
        self._replayed_lsn = expected - 1
        if progress is not None:
            progress("replay", done, done)

    # --- applying records (recovery and runtime share this; caller holds _lock) --------------

    def _note_record(self, seg: int, payload_len: int) -> None:
        self._seg_total[seg] += payload_len + FRAME_BYTES
        self._bytes_since_checkpoint += payload_len + FRAME_BYTES

    def _apply(self, kind: int, entries: list[record.Entry], seg: int, payload_off: int,
               lsn: int) -> list[tuple[int, int]]:
        """Apply a record to the key directory; returns (entry index, version lsn) now live.

        A relocation entry applies only if the key still holds the version it copied (same
        lsn): a commit that overwrote or deleted the key in between wins, at runtime and at
        replay alike, because both see records in lsn order.
        """
        applied = []
        keydir = self._keydir
        seg_live = self._seg_live
        relocation = kind == record.KIND_RELOCATE
        for index, entry in enumerate(entries):
            key = entry.key
            old = keydir.get(key)
            if relocation:
                if old is None or old[4] != entry.orig_lsn:
                    continue
                version = entry.orig_lsn
            else:
                version = lsn
            was_value = old is not None and old[0] != TOMBSTONE_SEGMENT
            if was_value:
                seg_live[old[0]] -= old[2]
            if entry.size < 0:
                self._apply_delete(key, entry.meta, version, old, was_value)
                continue
            keydir.put(key, seg, payload_off + entry.value_pos, entry.size, entry.meta, version)
            seg_live[seg] += entry.size
            if old is None:
                self._keys.add(key)
                self._key_bytes += len(key)
            elif not was_value:
                self._tombstones -= 1
            applied.append((index, version))
        return applied

    def _apply_delete(self, key: bytes, meta: bytes, version: int, old: tuple | None,
                      was_value: bool) -> None:
        """A delete with a clock leaves a tombstone (the clock must survive, see the module
        docstring); one without a clock has nothing to remember and removes the key."""
        if was_value:
            self._cache.discard(key)
            self._pending.pop(key, None)
        if len(meta) > record.META_FIXED_BYTES:
            self._keydir.put(key, TOMBSTONE_SEGMENT, 0, 0, meta, version)
            if old is None:
                self._keys.add(key)
                self._key_bytes += len(key)
            if was_value or old is None:
                self._tombstones += 1
        elif old is not None:
            self._keydir.delete(key)
            self._keys.remove(key)
            self._key_bytes -= len(key)
            if not was_value:
                self._tombstones -= 1

    # --- writes ---------------------------------------------------------------------------

    def submit(self, updates: list[Update], *, wake: bool = True) -> int:
        """Append ONE atomic record with every update, apply it (visible to get), return its lsn.

        The record is not yet durable: call wait_durable(lsn) before acknowledging it. An empty
        list writes nothing and returns the last lsn. ``wake=False`` leaves the WAL writer
        thread asleep, for a caller about to wait_durable: the waiter writes the record
        itself when nobody else is writing (one thread hand-over less each way).
        """
        rows = [_check_update(u) for u in updates]
        if not rows:
            with self._lock:
                return self._open_wal().last_lsn
        payload, entries = record.encode_commit(rows)
        values = [row[1] for row in rows]
        with self._lock:
            lsn, _ = self._append_and_apply(record.KIND_COMMIT, payload, entries, values)
            wal = self._wal
        if wake:
            _wake_writer(wal)
        return lsn

    def _append_and_apply(self, kind: int, payload: bytes, entries: list[record.Entry],
                          values: list[bytes | None]) -> tuple[int, int]:
        """Append a record and apply it (caller holds _lock): (lsn, number of values now live).

        The WAL writer is not woken here: the caller wakes it once _lock is released (see
        _wake_writer), so the writer thread never preempts a thread holding _lock.
        """
        wal = self._open_wal()
        lsn, seg, off = wal.submit_located(payload, False)
        self._note_record(seg, len(payload))
        applied = self._apply(kind, entries, seg, off, lsn)
        self._applied_lsn = lsn
        if applied:
            # Until the record is written, these versions exist only in memory.
            pending = self._pending
            for index, version in applied:
                pending[entries[index].key] = (version, values[index], lsn)
            # A relocation copies cold values forward: caching them would evict hot ones.
            self._pending_order.append((lsn, [entries[index].key for index, _ in applied],
                                        kind != record.KIND_RELOCATE))
        self._release_pending(wal.durable_lsn)
        return lsn, len(applied)

    def _release_pending(self, durable_lsn: int) -> None:
        """Move values whose records are durable (hence written) from _pending to the cache."""
        order = self._pending_order
        pending = self._pending
        while order and order[0][0] <= durable_lsn:
            record_lsn, keys, cache = order.popleft()
            for key in keys:
                held = pending.get(key)
                if held is not None and held[2] == record_lsn:
                    del pending[key]
                    if cache and self.cache_writes:
                        self._cache.put(key, held[0], held[1])
                    else:
                        self._cache.refresh(key, held[0], held[1])

    def wait_durable(self, lsn: int) -> None:
        """Block until every record up to lsn is fsync'd (shares the fsync with other threads)."""
        wal = self._open_wal()
        wal.wait(lsn)
        order = self._pending_order
        # A peek without the lock (deque indexing is atomic under the GIL): most of the time
        # another waiter has already moved these values to the cache.
        if order and order[0][0] <= lsn:
            with self._lock:
                if self._wal is not None:
                    self._release_pending(self._wal.durable_lsn)

    def sync(self) -> int:
        """fdatasync every record submitted so far, whatever the fsync policy; return the
        last lsn it covers. A replica's storage (fsync off) calls it before Raft may forget
        the log entries it applied."""
        with self._lock:
            wal = self._open_wal()
            lsn = wal.last_lsn
        wal.sync()
        self.wait_durable(lsn)  # lets go of the values held until written
        return lsn

    @property
    def synced_lsn(self) -> int:
        """The last lsn that is on disk for sure (fdatasync'd, or found there at open)."""
        return self._open_wal().synced_lsn

    def commit(self, updates: list[Update]) -> int:
        """submit + wait_durable: returns the lsn once the commit is durable."""
        lsn = self.submit(updates)
        self.wait_durable(lsn)
        return lsn

    @property
    def durable_lsn(self) -> int:
        return self._open_wal().durable_lsn


    def check(self, decode: Callable[[StoredVersion], object],
              progress: Callable[[int], None] | None = None, *, reserved: bytes | None = None) -> CheckReport:
        """Read every key's value and ``decode`` it (the caller's format): the keys whose value
        fails its checksum or does not decode (CorruptData), each with why; keys starting
        with ``reserved`` are the caller's own bookkeeping and left out. ``progress(keys read)``."""
        report = CheckReport()
        for raw in self.keys():
            if reserved is not None and raw.startswith(reserved):
                continue
            try:
                stored = self.get(raw)
                if stored.value is None:
                    continue  # a deleted key's tombstone: no value
                decode(stored)
            except CorruptData as exc:
                report.damaged.append((raw.decode("utf-8", "replace"), str(exc)))
            report.keys += 1
            if progress is not None and report.keys % CHECK_PROGRESS_EVERY == 0:
                progress(report.keys)
        return report

    @property
    def last_lsn(self) -> int:
        return self._open_wal().last_lsn

    @property
    def applied_lsn(self) -> int:
        """The last lsn whose record every read sees: records are applied in lsn order, each
        in the hold of the lock that assigned its lsn, and this moves once it is applied.
        (A read without the lock may see a record assigned after it, never miss one before.)"""
        self._open_wal()
        return self._applied_lsn

    # --- reads ----------------------------------------------------------------------------

    def get(self, key: bytes) -> StoredVersion:
        """The current version of key (visible from submit on), or ABSENT.

        Without the lock when the version is a tombstone or its value is held (pending, or
        cached) at the lsn the key directory gives: the directory's entry is read in one call,
        which a submit makes whole, and a value found at that lsn is that version's. Only a
        value read from its file takes the lock. Commits hold the lock, and readers queueing
        behind them cost every thread a GIL hand-over each time the lock passes on: 8 threads
        committed 2.5 times fewer transactions a second than 1 did.
        """
        self._open_wal()
        entry = self._keydir.get(key)
        found = self._in_memory(key, entry)
        if found is not None:
            return found
        value = self._cache.get(key, entry[4])
        if value is None:
            return self._get_from_file(key, entry[4])
        return _stored(value, entry[3], entry[4])

    def _get_from_file(self, key: bytes, missed_lsn: int) -> StoredVersion:
        """get(), under the lock, after the cache missed the version at ``missed_lsn``: the
        key may have changed since, or its value be pending still (then it is taken there)."""
        with self._lock:
            self._open_wal()
            entry = self._keydir.get(key)
            found = self._in_memory(key, entry)
            if found is not None:
                return found
            seg, off, size, meta, lsn = entry
            # Not pending: its record is written. At missed_lsn the cache was just asked.
            value = None if lsn == missed_lsn else self._cache.get(key, lsn)
            if value is None:
                fd = self._acquire_value_file(seg, size)
        if value is None:
            value = self._read_value(fd, seg, off, size, meta, key=key, lsn=lsn)
        return _stored(value, meta, lsn)

    def _in_memory(self, key: bytes, entry: tuple | None) -> StoredVersion | None:
        """The version a key directory entry gives when no value is to be read: none, a
        tombstone, or a value still pending; None when its value is in the cache or a file."""
        if entry is None:
            return ABSENT
        seg, _, _, meta, lsn = entry
        if seg == TOMBSTONE_SEGMENT:
            return _stored(None, meta, lsn)
        held = self._pending.get(key)
        if held is not None and held[0] == lsn:
            return _stored(held[1], meta, lsn)
        return None

    def stamp_of(self, key: bytes) -> tuple[bytes, int]:
        """(clock, timestamp) of key's current version (a deleted key's too); (b"", 0) when it
        has none. No value is read: what validation needs of a read or overwritten key, at a
        fraction of get()'s cost. No lock: the key directory's entry is read in one call."""
        self._open_wal()
        entry = self._keydir.get(key)
        if entry is None:
            return b"", 0
        meta = entry[3]
        return meta[META_FIXED:], _timestamp_of(meta)[0]

    def _acquire_value_file(self, seg: int, size: int) -> int | None:
        """The fd to read a value from (call with the lock held), or None for an empty value:
        it needs no bytes, and its segment holds no live bytes, so it may already be gone."""
        return self._files.acquire(seg) if size else None

    def _read_value(self, fd: int | None, seg: int, off: int, size: int, meta: bytes, *,
                    key: bytes | None = None, lsn: int = 0) -> bytes:
        """pread a value without the lock (the fd stays open until released), check its CRC,
        give the fd back and, given the key, keep the value in the cache."""
        value = b""
        problem: str | None = "unread"
        try:
            value = os.pread(fd, size, off) if fd is not None else b""
            problem = _value_problem(value, size, meta)
        finally:
            with self._lock:
                if fd is not None:
                    self._files.release(fd)
                if key is not None and problem is None:
                    self._cache.put(key, lsn, value)
        if problem is not None:
            raise CorruptData(f"value of {size} bytes at offset {off} of segment {seg}: {problem}")
        return value

    def scan(self, prefix: bytes = b"", start: bytes | None = None, end: bytes | None = None,
             limit: int | None = None, *, deleted: bool = False) -> Iterator[tuple[bytes, StoredVersion]]:
        """Live keys with the prefix, in key order, from start (inclusive) to end (exclusive);
        with ``deleted`` the deleted ones too, value None (not counted towards ``limit``).

        Walks the sorted key index a batch at a time, so concurrent commits proceed; a key
        written during the scan may or may not appear (no snapshot isolation here).
        """
        if limit is not None and limit <= 0:
            return
        produced = 0
        for key in self.keys(prefix, start, end):
            version = self.get(key)
            if version.value is None:
                if deleted:
                    yield key, version
                continue  # a deleted key (its tombstone is indexed), or deleted meanwhile
            yield key, version
            produced += 1
            if produced == limit:
                return

    def keys(self, prefix: bytes = b"", start: bytes | None = None,
             end: bytes | None = None) -> Iterator[bytes]:
        """The keys of scan()'s range in key order (deleted keys with a tombstone too),
        without reading a value: the sorted key index a batch at a time, so concurrent
        commits proceed."""
        def take(low: bytes, inclusive: bool) -> list[bytes]:
            with self._lock:
                self._open_wal()
                return list(islice(self._keys.irange(low, end, inclusive=(inclusive, False)), SCAN_BATCH))

        return key_batches(take, prefix, start)

    def node_id(self) -> int:
        """A stable random id made at the first open (``path/NODE_ID``): this node's clock entry."""
        return self._node_id

    # --- checkpoint -----------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Write a hint file of the key directory, then delete WAL segments no longer needed.

        Commits continue meanwhile: the key directory is copied a batch at a time and the hint
        records the lsn at the START, so replay from there fixes whatever changed during the
        copy (applying records is idempotent in lsn order).
        """
        self._refuse_if_read_only("checkpoint")
        with self._maintenance:
            self._open_wal()
            self._write_checkpoint()
            self._truncate_dead_prefix()

    def _write_checkpoint(self) -> None:
        with self._lock:
            wal = self._open_wal()
            checkpoint_lsn = wal.last_lsn
            self._bytes_since_checkpoint = 0

        def records_durable() -> None:
            # Entries copied after checkpoint_lsn may point at records not yet fsync'd; the hint
            # must not name a location a crash could still tear. sync(), not wait(): under the
            # "interval" and "off" policies durable means written, and a hint pointing past the
            # end of a segment after a power cut would make the store unopenable.
            wal.sync()

        write_hint(self._hint_path, checkpoint_lsn, self._snapshot_entries(),
                   before_rename=records_durable)
        with self._lock:
            self._checkpoint_lsn = checkpoint_lsn

    def _snapshot_entries(self) -> Iterator[tuple[bytes, int, int, int, bytes, int]]:
        low = None
        while True:
            with self._lock:
                self._open_wal()
                keys = self._keys.irange(low, None, inclusive=(False, False)) if low is not None else iter(self._keys)
                batch = [(key, *self._keydir.get(key)) for key in islice(keys, CHECKPOINT_BATCH)]
            if not batch:
                return
            yield from batch
            low = batch[-1][0]

    def _truncate_dead_prefix(self) -> list[int]:
        """Delete the oldest segments holding no live value and only records < the checkpoint.

        The segment holding the checkpoint's own record is kept: recovery checks that record
        is still there to tell a torn tail from lost checkpointed data.
        """
        wal = self._open_wal()
        with self._lock:
            segments = sorted(self._wal.segments())
            doomed = []
            # A segment's id is its first lsn, so segment seg holds lsns [seg, following).
            for seg, following in zip(segments, segments[1:], strict=False):
                if self._seg_live.get(seg, 0) != 0 or following > self._checkpoint_lsn:
                    break
                doomed.append((seg, following))
        if not doomed:
            return []
        wal.truncate_before(doomed[-1][1])
        failpoint("storage.compact.after_truncate")
        gone = [seg for seg, _ in doomed if not os.path.exists(segment_path(self._wal_dir, seg))]
        with self._lock:
            for seg in gone:
                self._files.forget(seg)  # a reader mid-pread keeps the unlinked file readable
                self._seg_live.pop(seg, None)
                self._seg_total.pop(seg, None)
        return gone

    # --- backup ---------------------------------------------------------------------------

    def backup(self, target: str, progress: Callable[[int, int], None] | None = None) -> int:
        """Copy the store as it is at one moment into the new directory ``target``, while
        commits go on; returns the bytes copied (``progress(done, total)`` as it goes).

        A fresh hint, then every WAL segment up to where the log ended at that moment (the
        last one cut there: a prefix of the log, so one consistent state holding every commit
        acknowledged before the call). Segments are only appended to, and compaction and
        checkpoints, which delete them, wait meanwhile. InvalidArgument if target is not empty.
        """
        new_store_directory(target, "backup")
        with self._maintenance:
            if not self.read_only:  # read-only: the hint found and every whole record after it
                self._write_checkpoint()
            wal = self._open_wal()
            tail_segment, tail_bytes = wal.tail()
            wal.sync()  # the records before tail_bytes are written, whole
            with self._lock:
                segments = sorted(s for s in wal.segments() if s <= tail_segment)
            make_dirs_durably(os.path.join(target, "wal"))
            copies = [(os.path.join(self.path, name), os.path.join(target, name), None)
                      for name in ("NODE_ID", "hint", RESOLVERS_FILE)
                      if os.path.exists(os.path.join(self.path, name))]
            copies += [(segment_path(self._wal_dir, s), segment_path(os.path.join(target, "wal"), s),
                        tail_bytes if s == tail_segment else None) for s in segments]
            return copy_durably(copies, progress)

    # --- compaction -----------------------------------------------------------------------

    def compact(self, progress: Progress | None = None) -> CompactionStats:
        """Rewrite the live values of every sealed WAL segment at the head, delete the segments.

        Crash-safe at every point: relocations are ordinary WAL records (replay re-applies
        them only to keys still at the copied version), segments are deleted only after a
        hint that no longer points into them is durable.
        """
        self._refuse_if_read_only("compact")
        with self._maintenance:
            with self._lock:
                segments = sorted(self._open_wal().segments())
            if len(segments) < 2:
                return CompactionStats()
            return self._compact_through(segments[-2], progress)

    def _compact_through(self, last_victim: int, progress: Progress | None) -> CompactionStats:
        with self._lock:
            wal = self._open_wal()
            victims = {s for s in wal.segments() if s <= last_victim}
            victims.discard(max(wal.segments()))  # never the active segment
            live_total = sum(self._seg_live.get(s, 0) for s in victims)
            seg_sizes = {s: self._seg_total.get(s, 0) for s in victims}
        if not victims:
            return CompactionStats()
        # A sealed segment may still have records waiting in the group-commit buffer; read
        # only what is on disk.
        wal.wait(wal.last_lsn)
        moved_keys = moved_bytes = 0
        batch: list[tuple[bytes, bytes, bytes, int]] = []
        batch_bytes = 0
        last_lsn = 0
        for key, seg, off, size, meta, lsn in self._live_entries_in(victims):
            if self._stop.is_set():
                return CompactionStats(sorted(victims), moved_keys, moved_bytes, 0, aborted=True)
            value = self._read_victim(seg, off, size, meta)
            batch.append((key, value, meta, lsn))
            batch_bytes += size
            if batch_bytes >= RELOCATE_BATCH_BYTES:
                last_lsn, n = self._relocate(batch)
                moved_keys += n
                moved_bytes += batch_bytes
                batch, batch_bytes = [], 0
                failpoint("storage.compact.mid_copy")
                if progress is not None:
                    progress("compact", moved_bytes, live_total)
        if batch:
            last_lsn, n = self._relocate(batch)
            moved_keys += n
            moved_bytes += batch_bytes
        if last_lsn:
            self.wait_durable(last_lsn)  # also lets go of the copied values held until written
        failpoint("storage.compact.after_copy")
        self._write_checkpoint()
        failpoint("storage.compact.after_checkpoint")
        gone = self._truncate_dead_prefix()
        self._compactions += 1
        if progress is not None:
            progress("compact", moved_bytes, moved_bytes)
        reclaimed = sum(seg_sizes.get(seg, 0) for seg in gone)
        return CompactionStats(sorted(victims), moved_keys, moved_bytes, reclaimed)

    def _live_entries_in(self, victims: set[int]) -> Iterator[tuple[bytes, int, int, int, bytes, int]]:
        """Key directory entries located in the victim segments, a batch at a time."""
        for batch in _batched(self._snapshot_entries(), CHECKPOINT_BATCH):
            live = [entry for entry in batch if entry[1] in victims]
            live.sort(key=lambda entry: (entry[1], entry[2]))  # read each segment sequentially
            yield from live

    def _read_victim(self, seg: int, off: int, size: int, meta: bytes) -> bytes:
        with self._lock:
            fd = self._acquire_value_file(seg, size)
        return self._read_value(fd, seg, off, size, meta)

    def _relocate(self, moves: list[tuple[bytes, bytes, bytes, int]]) -> tuple[int, int]:
        payload, entries = record.encode_relocation(moves)
        with self._lock:
            result = self._append_and_apply(record.KIND_RELOCATE, payload, entries,
                                            [move[1] for move in moves])
            wal = self._wal
        _wake_writer(wal)
        return result

    def _segment_usage(self) -> list[SegmentUsage]:
        with self._lock:
            segments = sorted(self._open_wal().segments())
            return [SegmentUsage(s, self._seg_total.get(s, 0), self._seg_live.get(s, 0))
                    for s in segments]

    def _background(self) -> None:
        while not self._stop.wait(self._compaction_interval) and self.maintain():
            pass

    def maintain(self) -> bool:
        """One round of background work: compact when the oldest segments are mostly dead,
        checkpoint when the tail grows. False once the store is closed."""
        try:
            with self._maintenance:
                if self._closed or self._stop.is_set():
                    return False
                sealed = self._segment_usage()[:-1]
                last = choose_prefix(sealed, min_dead_ratio=self._compaction_min_dead_ratio,
                                     min_dead_bytes=self._segment_bytes // 2)
                if last is not None:
                    self._compact_through(last, self._progress)
                elif self._bytes_since_checkpoint >= self._checkpoint_bytes:
                    self._write_checkpoint()
                    self._truncate_dead_prefix()
        except StoreClosed:
            return False
        except BaseException as exc:  # keep serving; stats() reports it
            self._background_error = exc
        return True

    # --- introspection and lifecycle -------------------------------------------------------

    def stats(self) -> dict:
        """Counters: keys, per-segment live/dead bytes, cache hits/misses, memory estimates."""
        usage = self._segment_usage()
        with self._lock:
            wal = self._open_wal()
            keys = len(self._keydir) - self._tombstones
            return {
                "keys": keys,
                "tombstones": self._tombstones,
                "segments": {u.segment_id: {"bytes": u.total_bytes, "live_bytes": u.live_bytes,
                                            "dead_bytes": u.dead_bytes} for u in usage},
                "live_bytes": sum(u.live_bytes for u in usage),
                "dead_bytes": sum(u.dead_bytes for u in usage),
                "cache_entries": len(self._cache),
                "cache_bytes": self._cache.bytes,
                "cache_hits": self._cache.hits,
                "cache_misses": self._cache.misses,
                "pending_values": len(self._pending),
                "keydir_bytes": self._keydir.memory_bytes(),
                "key_index_bytes": self._key_bytes + KEY_INDEX_OVERHEAD * len(self._keydir),
                "last_lsn": wal.last_lsn,
                "durable_lsn": wal.durable_lsn,
                "checkpoint_lsn": self._checkpoint_lsn,
                "compactions": self._compactions,
                "background_error": repr(self._background_error) if self._background_error else None,
            }

    def _open_wal(self) -> WalWriter:
        wal = self._wal
        if wal is None or self._closed:
            raise StoreClosed(f"storage at {self.path} is closed")
        return wal

    def close(self, *, checkpoint: bool = True) -> None:
        """Stop background work, checkpoint if anything changed, close the WAL; idempotent.

        ``checkpoint=False`` closes as a crash leaves the store: the hint stays the last
        one written, and the next open replays the WAL from there (the simulator's crashes).
        """
        if self._closed:
            return
        self._stop.set()
        if self._maintainer is not None:
            self._maintainer.discard(self)
        if self._thread is not None and self._thread.is_alive():
            self._thread.join()
        try:
            with self._maintenance:
                if (checkpoint and self._wal is not None and not self._closed
                        and self._bytes_since_checkpoint and not self.read_only):
                    self._write_checkpoint()
        finally:
            with self._lock:
                self._closed = True
                wal, self._wal = self._wal, None
                self._files.close_all()
                self._pending.clear()
                self._pending_order.clear()
                self._cache.close()
            try:
                if wal is not None:
                    wal.close()  # raises the WAL's failure (a full disk), if it had one
            finally:
                self._dir_lock.release()  # so that this process can open the store again

    def _refuse_if_read_only(self, what: str) -> None:
        if self.read_only:
            raise ReadOnlyStore(f"{self.path} was opened with read_only=True: it cannot {what}")

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _refuse_unless_store(path: str) -> None:
    """InvalidArgument unless path holds a store (a read-only open creates nothing)."""
    if not os.path.isdir(os.path.join(path, "wal")):
        raise InvalidArgument(f"{path} is not a pykv store (it has no wal directory); a "
                              "read-only open creates none")


def _check_update(update: Update) -> tuple[bytes, bytes | None, bytes, int]:
    """Validate one update; bad input raises InvalidKey/KeyTooLarge/InvalidValue."""
    if not isinstance(update, Update):
        raise InvalidValue(f"updates must be storage.Update, not {type(update).__name__}")
    key, value, clock, timestamp = update.key, update.value, update.clock, update.timestamp
    if not isinstance(key, bytes):
        raise InvalidKey(f"storage keys must be bytes, not {type(key).__name__}")
    if not 0 < len(key) <= MAX_KEY_BYTES:
        raise KeyTooLarge(f"storage keys must be 1 to {MAX_KEY_BYTES} bytes; got {len(key)}")
    if value is not None and not isinstance(value, bytes):
        raise InvalidValue(f"an encoded value must be bytes or None, not {type(value).__name__}")
    if not isinstance(clock, bytes):
        raise InvalidValue(f"a clock must be bytes, not {type(clock).__name__}")
    if len(clock) > MAX_CLOCK_BYTES:
        raise LimitError(f"a clock of {len(clock)} bytes is over the {MAX_CLOCK_BYTES}-byte limit")
    if isinstance(timestamp, bool) or not isinstance(timestamp, int) or not 0 <= timestamp <= MAX_TIMESTAMP:
        raise InvalidValue(f"a timestamp must be an int in [0, 2**64), not {timestamp!r}")
    return key, value, clock, timestamp


def _value_problem(value: bytes, size: int, meta: bytes) -> str | None:
    if len(value) != size:
        return f"short read ({len(value)} bytes)"
    if crc32c(value) != record.split_meta(meta)[1]:
        return "checksum mismatch"
    return None


def _batched(iterable, n: int):
    it = iter(iterable)
    while batch := list(islice(it, n)):
        yield batch
