"""A shard state machine whose values live on disk: the embedded store's Storage, fsync off.

``StoredShardState`` keeps the same replicated state as ``ShardState`` (pykv.replica.shard)
but its committed versions are in a ``pykv.storage.Storage`` directory (bitcask: values on
disk, an in-memory key directory, a bounded read cache), so a node's memory does not grow
with the data. The replicated metadata (remembered outcomes, decisions, prepared
transactions, resolver names) and the applied log index are kept in the same Storage under
reserved keys that start with 0xFF (never valid UTF-8, so never a user key), written in the
SAME atomic record as the updates of the command that changed them. After a crash the
storage therefore holds a consistent prefix of the applied log, and its applied index says
where the Raft log replay resumes.

Remembered outcomes and 2PC decisions (one per transaction, capped at ``remembered`` each)
are not a row per transaction: each flush writes those of its run of commands as ONE row
(``_RUNS`` + a sequence number), in the order they were recorded, and a run's row is deleted
once newer runs hold ``remembered`` entries of each kind it has (by then every replica has
forgotten all of them). Loading replays the runs in order through the same bounded tables,
so a restarted replica remembers exactly the txids, in the order, that its peers do.

Durability: the Storage runs with ``fsync="off"``: what makes a commit durable is the Raft
log, fsync'd in the node's WAL before anything is acknowledged. The one rule this needs is
that the Raft log is never compacted past what the storage has made durable, so
``make_durable()`` (a flush, then an fdatasync of the storage's WAL) runs before every Raft
snapshot, and a restart replays the Raft log from the storage's applied index. The storage's
own checkpoints (hint files, which bound its replay) are its maintainer's business: one
costs a pass over every key, too long for the event loop a snapshot runs on.
"""

from __future__ import annotations

import shutil
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from pykv.codec import decode_value, encode_value, pack, unpack
from pykv.replica.shard import (
    _FORGET,
    Prepared,
    ShardState,
    Unfinished,
    _prepared_wire,
    _unfinished_from_wire,
    _unfinished_wire,
    bounded_runs,
)
from pykv.storage.cache import SharedCache
from pykv.storage.maintenance import Maintainer
from pykv.storage.store import CheckReport, Storage, StoredVersion, Update
from pykv.txn.model import ABSENT, EVERY_KEY, MISSING, KeyRange, KeyUpdate, Versioned, first_live

_META = b"\xff"
# A deleted key is stored as this value (encode_value never makes empty bytes) rather than
# deleted from the storage: the tombstone's clock must survive, or a transaction that read
# the key before a delete and a blind re-create would see "the same" clock again.
_TOMBSTONE = b""
_APPLIED = b"\xffa"
_APPLIED_ROW = Update(_APPLIED, b"", b"", 0)  # marks "some entry applied"; flush() writes the index
_PREPARED = b"\xffp"
_UNFINISHED = b"\xffu"  # + txid: [txid, participants, timestamp] of a commit not yet released
_RESTORE_RUN = 4096  # remembered entries per run row when a snapshot is installed
_RESTORE_BATCH = 2000  # rows per storage submit when a snapshot is installed, at most,
_RESTORE_BATCH_BYTES = 4 << 20  # and bytes of values
_RUNS = b"\xffm"  # + a big-endian run number: [[kind, txid, value, timestamp], ...] remembered in a flush
_WATERMARKS = b"\xffw"  # [outcomes, decisions]: the newest request timestamps forgotten
_TXID = struct.Struct(">Q")
_BORN_AND_GONE = (_PREPARED, _UNFINISHED)  # records that most often go within their flush
# Pending (written, not yet released) versions are released every this many records.
_RELEASE_EVERY = 256
# Rows applied but not yet written to the storage before a batch writes them at once; the
# host also flushes every shard every few ticks (ReplicaHost.flush_ticks).
_FLUSH_ROWS = 1024
# A storage compacts sealed segments only, so each shard may hold about two segments of
# dead values: the segment size is shared out of one node-wide figure by the partition
# count, or a node's disk would grow with the number of shards it hosts.
SEGMENT_BYTES_PER_NODE = 256 << 20
MIN_SEGMENT_BYTES = 4 << 20
MAX_SEGMENT_BYTES = 64 << 20
# The storage's maintainer checkpoints it every this many WAL bytes, so that a restarted node
# replays at most about this much per shard (0.06 s at 4 MiB of 100-byte values): about
# what a Raft snapshot left before make_durable stopped checkpointing.
CHECKPOINT_BYTES = 4 << 20


def segment_bytes_for(partitions: int) -> int:
    """The value-log segment size of each shard's storage when the cluster has ``partitions``."""
    return min(MAX_SEGMENT_BYTES, max(MIN_SEGMENT_BYTES, SEGMENT_BYTES_PER_NODE // max(1, partitions)))


def _meta_key(kind: str, key: Any) -> bytes:
    if kind == "r":
        return _META + b"r" + str(key).encode("utf-8")
    return _META + kind.encode() + _TXID.pack(key & 0xFFFFFFFFFFFFFFFF)


def _record_bytes(txid: int, record: Prepared | Unfinished) -> bytes:
    """A prepared transaction's or an unfinished commit's row value."""
    if isinstance(record, Prepared):
        return pack(_prepared_wire(record))
    return pack(_unfinished_wire(txid, record))


def _encoded_bound(bound: str | None) -> bytes | None:
    return None if bound is None else bound.encode("utf-8")


def _versioned(stored: StoredVersion) -> Versioned:
    if stored.value is None:  # absent, or deleted at the storage level: keeps its clock
        return ABSENT if not stored.clock else Versioned(MISSING, stored.clock, stored.timestamp)
    value = MISSING if stored.value == _TOMBSTONE else decode_value(stored.value)
    return Versioned(value, stored.clock, stored.timestamp)


def _value_size(row: Update) -> int:
    return len(row.value or b"")


def _encoded(value: Any) -> bytes:
    return _TOMBSTONE if value is MISSING else encode_value(value)


class StoredShardState(ShardState):
    """ShardState over a Storage directory (see the module docstring)."""

    durable = True  # make_durable() syncs the storage: it is the snapshot

    def __init__(
        self, shard: int, path: Path, *, cache_bytes: int = 8 << 20,
        cache: SharedCache | None = None, maintainer: Maintainer | None = None,
        remembered: int | None = None, segment_bytes: int = MAX_SEGMENT_BYTES,
        maintenance: bool = True,
    ) -> None:
        """``cache``: the node's read cache, shared by all its shards (else ``cache_bytes`` of
        this shard's own); ``maintainer``: the node's compaction thread (else one of its own);
        ``remembered``: txids remembered per table (ShardState); ``segment_bytes``: the
        storage's value-log segments (segment_bytes_for); ``maintenance`` False: no background
        compaction or checkpoints at all, whoever drives the state does them (the
        simulator, at moments its seed decides)."""
        super().__init__(shard, remembered=remembered)
        self.path = Path(path)
        self._cache_bytes = cache_bytes
        self._shared_cache = cache
        self._maintainer = maintainer
        self._segment_bytes = segment_bytes
        self._maintenance = maintenance
        self._leading = False
        self.store = self._open_store()
        self._batch: list[Update] = []
        # Commands applied since the last flush(): their rows, and the versions they wrote
        # (what get() must already see). One flush = one atomic storage record for a run
        # of log entries (many batches), ending with the applied index of the last one.
        self._rows: list[Update] = []
        # Prepared transactions and unfinished commits journaled since the last flush,
        # encoded only by the flush: most finish (or are released) before it, and then
        # neither their record nor its removal is written.
        self._deferred_rows: dict[bytes, tuple[int, Prepared | Unfinished]] = {}
        self._overlay: dict[str, Versioned] = {}
        self._since_release = 0
        self._runs = _Runs(self.remembered)
        self._watermarks_stored = False  # whether the storage holds the _WATERMARKS row
        # The applied index the storage holds. Entries with no command (a new leader's
        # first, a membership change) advance applied_index without a row, and a
        # checkpoint must still record them: Raft may drop the log up to that index.
        self._applied_stored = 0
        self._load_metadata()

    # --- loading ------------------------------------------------------------------------------

    def _load_metadata(self) -> None:
        now = self.clock()
        for key, stored in self.store.scan(prefix=_META):  # in key order: runs by number
            if stored.value is None:
                continue
            kind, rest = key[1:2], key[2:]
            value = unpack(stored.value)
            if key == _APPLIED:
                self.applied_index = self._applied_stored = value
            elif kind == _RUNS[1:]:
                self._runs.loaded(_TXID.unpack(rest)[0], value)
                for entry in value:
                    table = self.outcomes if entry[0] == "o" else self.decisions
                    if entry[1] not in table:
                        table.add(entry[1], entry[2], entry[3] if len(entry) > 3 else 0)
            elif key == _WATERMARKS:
                self._watermarks_stored = True
                # What was forgotten before the oldest run still on disk is known only here.
                self.outcomes.watermark = max(self.outcomes.watermark, value[0])
                self.decisions.watermark = max(self.decisions.watermark, value[1])
            elif kind == b"p":
                self._lock_quietly(self._prepared_from_wire(value, now))
            elif kind == b"u":
                txid, unfinished = _unfinished_from_wire(value, now)
                self.unfinished[txid] = unfinished
            elif kind == b"r":
                super()._register(rest.decode("utf-8"), value)
        self._batch = []  # loading re-journals nothing

    def _watermarks_row(self) -> Update:
        """The _WATERMARKS row, for a flush or a restore (which always write it)."""
        self._watermarks_stored = True
        return Update(_WATERMARKS, pack([self.outcomes.watermark, self.decisions.watermark]), b"", 0)

    def _lock_quietly(self, prepared: Any) -> None:
        ShardState._lock(self, prepared)
        self._batch = []

    # --- the hooks of ShardState ----------------------------------------------------------------

    def apply(self, index: int, data: bytes) -> tuple[Any, Any]:
        self._batch = []
        try:
            result = super().apply(index, data)
        finally:
            batch, self._batch = self._batch, []
        self._rows += batch
        self._rows.append(_APPLIED_ROW)  # the applied index itself is encoded by flush()
        return result

    def flush(self) -> None:
        """Write every command applied since the last flush as ONE atomic storage record,
        ending with the applied index."""
        if not self._rows and self.applied_index == self._applied_stored:
            return
        latest: dict[bytes, Update] = {}
        born: list[bytes] = []  # prepared-transaction records first written in this run
        for row in self._rows:  # a key written twice keeps its last value
            if latest.pop(row.key, None) is None and row.value is not None and row.key.startswith(_BORN_AND_GONE):
                born.append(row.key)
            latest[row.key] = row
        for key in born:
            # Prepared and finished (or recorded and released) within this run: the storage
            # never held the record (a txid has one only while none of it is live), so
            # neither row goes.
            if latest[key].value is None:
                del latest[key]
        for key, (txid, record) in self._deferred_rows.items():
            if key in latest and latest[key].value is not None:
                latest[key] = Update(key, _record_bytes(txid, record), b"", 0)
        for row in self._runs.rows():
            latest[row.key] = row
        latest[_WATERMARKS] = self._watermarks_row()
        latest[_APPLIED] = Update(_APPLIED, pack(self.applied_index), b"", 0)
        self._applied_stored = self.applied_index
        self._rows, self._deferred_rows = [], {}
        lsn = self.store.submit(list(latest.values()))
        self._overlay.clear()
        self._since_release += 1
        if self._since_release >= _RELEASE_EVERY:
            self._since_release = 0
            self.store.wait_durable(lsn)  # under fsync="off": written, and memory released

    def batch_applied(self) -> None:
        """Write the applied rows only once there are many: one storage record (and one wake
        of the storage's writer thread) per many batches, not per batch. Until then the
        overlay serves reads; a crash loses nothing, since the storage's applied index
        says where the Raft log replay resumes, and the log is never compacted past what
        make_durable() wrote."""
        if len(self._rows) >= _FLUSH_ROWS:
            self.flush()

    def _journal(self, kind: str, key: Any, value: Any) -> None:
        if kind in ("o", "d"):
            if value is not _FORGET:  # forgotten ones go with their whole run (see _Runs)
                self._runs.record(kind, key, *value)  # value: (outcome or decision, timestamp)
            return
        row_key = _meta_key(kind, key)
        if value is _FORGET:
            encoded = None
        elif isinstance(value, (Prepared, Unfinished)):
            self._deferred_rows[row_key] = (key, value)
            encoded = b""  # a placeholder: flush() encodes the record if it is still live
        else:
            encoded = pack(value)
        self._batch.append(Update(row_key, encoded, b"", 0))

    def _write(self, updates: list[KeyUpdate]) -> None:
        for u in updates:
            self._batch.append(
                Update(u.key.encode("utf-8"), _encoded(u.value), u.clock, u.timestamp)
            )
            self._overlay[u.key] = Versioned(u.value, u.clock, u.timestamp)
        # Not submitted yet: the whole command (updates, metadata, applied index) is ONE
        # record, written at the end of apply(), so a crash keeps all of it or none.

    def get(self, key: str) -> Versioned:
        found = self._overlay.get(key)
        if found is not None:
            return found
        return _versioned(self.store.get(key.encode("utf-8")))

    def stamp_of(self, key: str) -> tuple[bytes, int]:
        found = self._overlay.get(key)
        if found is not None:
            return found.clock, found.timestamp
        return self.store.stamp_of(key.encode("utf-8"))

    def key_count(self) -> int:
        """Stored keys (tombstones included), not counting the metadata records."""
        self.flush()
        meta = self._runs.stored_rows() + len(self.prepared)
        meta += len(self.resolver_names) + (1 if self.applied_index else 0)
        meta += 1 if self._watermarks_stored else 0
        return max(0, self.store.stats()["keys"] - meta)

    def _user_keys(self, key_range: KeyRange | None = None) -> Iterator[tuple[bytes, StoredVersion]]:
        prefix, start, end = key_range or EVERY_KEY
        for raw, stored in self.store.scan(prefix.encode("utf-8"), _encoded_bound(start), _encoded_bound(end)):
            if raw.startswith(_META):
                return
            yield raw, stored

    def _all_versions(self, key_range: KeyRange | None = None) -> Iterator[tuple[str, Versioned]]:
        self.flush()
        for raw, stored in self._user_keys(key_range):
            yield raw.decode("utf-8"), _versioned(stored)

    def _replace_versions(self, items: Iterator[tuple[str, Versioned]]) -> None:
        self._drop_views()
        self._rows, self._overlay, self._deferred_rows = [], {}, {}
        self._runs = _Runs(self.remembered)  # a fresh storage: no runs on disk
        self._watermarks_stored = False
        self._reset_store()
        self._submit_bounded(
            Update(k.encode("utf-8"), _encoded(v.value), v.clock, v.timestamp) for k, v in items
        )

    def _submit_bounded(self, rows: Iterable[Update]) -> None:
        """Submit rows a bounded batch at a time: an image may not fit in memory."""
        for batch in bounded_runs(rows, _value_size, _RESTORE_BATCH, _RESTORE_BATCH_BYTES):
            self.store.submit(batch)

    def _reset_store(self) -> None:
        self.store.close()
        shutil.rmtree(self.path, ignore_errors=True)
        self.store = self._open_store()

    def _open_store(self) -> Storage:
        store = Storage.open(
            str(self.path), fsync="off", cache_bytes=self._cache_bytes, cache=self._shared_cache,
            maintainer=self._maintainer, segment_bytes=self._segment_bytes,
            checkpoint_bytes=CHECKPOINT_BYTES, compaction=self._maintenance,
        )
        store.cache_writes = self._leading
        return store

    def set_leading(self, leading: bool) -> None:
        """Only a leader's writes go into the node's read cache: only a leader serves reads."""
        self._leading = self.store.cache_writes = leading

    def scan(
        self, prefix: str, start: str | None, end: str | None, limit: int | None,
        deleted: bool = False,
    ) -> list:
        self.flush()
        return first_live(self._range(prefix, start, end), limit, deleted)

    def scan_page(
        self, prefix: str, start: str | None, end: str | None, limit: int | None,
        deleted: bool, max_bytes: int,
    ) -> tuple[list, str | None]:
        self.flush()
        return super().scan_page(prefix, start, end, limit, deleted, max_bytes)

    def _range(self, prefix: str, start: str | None, end: str | None) -> Iterator[tuple[str, Versioned]]:
        for raw, stored in self.store.scan(
            prefix=prefix.encode("utf-8"),
            start=None if start is None else start.encode("utf-8"),
            end=None if end is None else end.encode("utf-8"),
        ):
            if raw.startswith(_META):
                return  # the replicated metadata sorts after every user key
            yield raw.decode("utf-8"), _versioned(stored)

    def restore(self, image: bytes | BinaryIO) -> None:
        """Replace everything with a snapshot (InstallSnapshot), durably, metadata included."""
        super().restore(image)  # replaces the versions (fresh store) and the metadata in memory
        rows = [Update(_APPLIED, pack(self.applied_index), b"", 0), self._watermarks_row()]
        remembered = [("o", *entry) for entry in self.outcomes.entries()]
        remembered += [("d", *entry) for entry in self.decisions.entries()]
        for start in range(0, len(remembered), _RESTORE_RUN):  # runs of a bounded size
            for entry in remembered[start:start + _RESTORE_RUN]:
                self._runs.record(*entry)
            rows += self._runs.rows()
        rows += [Update(_meta_key("r", p), pack(n), b"", 0) for p, n in self.resolver_names.items()]
        rows += [Update(_meta_key("p", t), _record_bytes(t, p), b"", 0) for t, p in self.prepared.items()]
        rows += [Update(_meta_key("u", t), _record_bytes(t, u), b"", 0) for t, u in self.unfinished.items()]
        self._batch = []
        self._submit_bounded(rows)
        self._applied_stored = self.applied_index
        self.make_durable()

    # --- durability and lifetime ------------------------------------------------------------------

    def make_durable(self) -> None:
        """fdatasync everything applied: the Raft log before here may then go."""
        self.flush()
        self.store.sync()

    def close(self) -> None:
        self.flush()
        self.store.close()

    def destroy(self) -> None:
        self.store.close()
        shutil.rmtree(self.path, ignore_errors=True)


class _Runs:
    """The remembered outcomes and decisions as rows, one per flush (see the module docstring)."""

    def __init__(self, cap: int) -> None:
        self._cap = cap  # the tables' size (ShardState.remembered)
        self._pending: list[list] = []  # [kind, txid, value, timestamp] since the last rows()
        self._stored: deque[tuple[int, int, int]] = deque()  # (run, outcomes, decisions)
        self._totals = {"o": 0, "d": 0}
        self._next = 1

    def record(self, kind: str, txid: int, value: Any, timestamp: int) -> None:
        self._pending.append([kind, txid, value, timestamp])

    def stored_rows(self) -> int:
        return len(self._stored)

    def loaded(self, run: int, entries: list) -> None:
        self._add(run, entries)
        self._next = run + 1

    def rows(self) -> list[Update]:
        """The row of the pending run, and deletions of runs every replica has forgotten."""
        if not self._pending:
            return []
        run, entries, self._pending = self._next, self._pending, []
        self._next += 1
        self._add(run, entries)
        rows = [Update(_RUNS + _TXID.pack(run), pack(entries), b"", 0)]
        while self._stored and self._forgotten(*self._stored[0][1:]):
            old, outcomes, decisions = self._stored.popleft()
            self._totals["o"] -= outcomes
            self._totals["d"] -= decisions
            rows.append(Update(_RUNS + _TXID.pack(old), None, b"", 0))
        return rows

    def _add(self, run: int, entries: list) -> None:
        outcomes = sum(1 for e in entries if e[0] == "o")
        self._stored.append((run, outcomes, len(entries) - outcomes))
        self._totals["o"] += outcomes
        self._totals["d"] += len(entries) - outcomes

    def _forgotten(self, outcomes: int, decisions: int) -> bool:
        # Each table keeps the ``cap`` newest insertions: once the newer runs hold that many
        # of a kind, none of this run's entries of that kind is left in it.
        cap = self._cap
        return (not outcomes or self._totals["o"] - outcomes >= cap) and (
            not decisions or self._totals["d"] - decisions >= cap
        )


def check_shards(shards_dir: Path, progress: Callable[[int], None] | None = None) -> CheckReport:
    """`pykv check` of a stopped node: read and decode every value of each shard replica in
    ``shards_dir`` (the node's ``shards/``); a damaged key is named "shard N: key".
    ``progress(keys read so far)``. Nothing is written: each is opened read-only."""
    report = CheckReport()
    for path in sorted(shards_dir.glob("g*"), key=lambda p: int(p.name[1:])):
        with Storage.open(str(path), read_only=True) as storage:
            found = storage.check(_versioned, _offset(progress, report.keys), reserved=_META)
        report.keys += found.keys
        report.damaged += [(f"shard {path.name[1:]}: {key}", why) for key, why in found.damaged]
    return report


def _offset(progress: Callable[[int], None] | None, before: int) -> Callable[[int], None] | None:
    return None if progress is None else lambda n: progress(before + n)
