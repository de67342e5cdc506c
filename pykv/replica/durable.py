"""The Raft log of every group a node hosts, in ONE group-commit WAL, plus snapshot files.

Layout of a node's data directory::

    wal/                 the node's WAL (pykv._engine.wal): one record per Ready batch
    snap/g{group}.snap   the latest state-machine snapshot of each group

A WAL record is one persisted batch of Ready work for many groups:
``pack([[group, hard_state|None, [entry...], snapshot_meta|None], ...])``. Because one
record (one fdatasync) covers every group that had work in a tick, a node hosting many
shards pays one fsync per tick, not one per shard (DESIGN §5).

Recovery replays the records in lsn order. Per group: a snapshot marker resets the log to
the snapshot (the snapshot file itself is written and fsync'd *before* the marker, so a
marker never points at a missing file); entries overwrite the stored log from their first
index on (a new leader may have truncated a conflicting suffix); the last hard state wins.

A snapshot file is a header, ``pack([meta, None, written_at, has_image, image_at])``,
followed by the image itself (the state machine's ``snapshot_parts``), so an image is
written and read a piece at a time (files of earlier releases hold the image inside the
header, or have no ``image_at``: the image follows the header; still read). An image that
arrived from a leader was written into a file with ``HEADER_ROOM`` bytes free in front
(``image_file``): that file becomes the snapshot file by writing the header into its room
and linking it into place, never copying the image.

Memory: a snapshot's image stays in its file. What Raft keeps of it is a ``SnapshotFile``
handle, loaded only to restore a state machine or to send InstallSnapshot, so a node does
not hold a copy of every shard's state (a shard whose storage is its own snapshot writes
no image at all: pykv.replica.host.StateImage); and the recovered log of a group is let go
once the group has taken it (``release``).

Compaction: after a group snapshots at index i, records that only hold that group's entries
<= i are garbage. ``NodeLog`` tracks, per group, the lsn of the oldest record it still
needs; whole WAL segments older than every group's need are deleted, after a checkpoint
record restates every group's hard state and snapshot marker (so both survive the deletion).

Recovery refuses (CorruptData) a directory that lost part of a node's memory: snapshot files
without any WAL (the terms, votes and acknowledged entries are gone), or a snapshot the WAL
records without its file (the entries before it are gone). Restarting from what is left
would let the node vote twice in a term or forget entries it acknowledged.
"""

from __future__ import annotations

import io
import itertools
import os
import shutil
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pykv._engine.wal import WalWriter, read_wal
from pykv.codec import UNPACK_ERRORS, pack, stream_unpacker, unpack
from pykv.errors import CorruptData
from pykv.raft.log import cut_from, cut_through
from pykv.raft.messages import Entry, HardState, PersistentState, Snapshot, SnapshotMeta

COPY_BYTES = 1 << 20  # an image is copied into its snapshot file this much at a time
HEADER_ROOM = 64 << 10  # bytes a received image's file leaves free for the header (image_file)


def image_file(path: Path) -> BinaryIO:
    """A new unbuffered file to write a received image into, positioned after the room
    for a snapshot header: ``NodeLog.save_snapshot`` adopts such a file instead of copying
    it, given a snapshot whose data names it (``roomy_file``)."""
    f = open(path, "w+b", buffering=0)
    f.seek(HEADER_ROOM)
    return f


@dataclass
class GroupWork:
    """What one group's Ready asks to persist."""

    group: int
    hard_state: HardState | None
    entries: tuple[Entry, ...]
    snapshot: Snapshot | None


@dataclass(frozen=True)
class SnapshotFile:
    """The data of the snapshot at ``index``, left in its file until someone needs it."""

    path: Path
    index: int

    def open(self) -> BinaryIO | None:
        """The image as a file to stream, positioned at its start; None when the snapshot
        keeps no image (its state machine's storage is the snapshot)."""
        f = open(self.path, "rb")
        try:
            meta_wire, inline, _, has_image, offset = _read_header(f)
            if SnapshotMeta.from_wire(meta_wire).index != self.index:
                # The file is only replaced together with the handle Raft keeps (both on the
                # driver's thread): a stale handle is a bug, and sending the wrong image is worse.
                raise CorruptData(f"{self.path} no longer holds the snapshot at index {self.index}")
            if not has_image:
                f.close()
                return None if inline is None else io.BytesIO(inline)
            f.seek(offset)
            return f
        except BaseException:
            f.close()
            raise

    def load(self) -> bytes | None:
        image = self.open()
        if image is None:
            return None
        with image:
            return image.read()


def _read_header(f: BinaryIO) -> tuple[Any, Any, int, bool, int]:
    """A snapshot file's header: (meta wire, an inline image of an older file or None,
    written_at, whether the image follows, the offset where it starts)."""
    unpacker = stream_unpacker(f)
    try:
        header = next(unpacker)
    except (StopIteration, *UNPACK_ERRORS) as exc:
        raise CorruptData(f"{getattr(f, 'name', 'a snapshot file')} has no readable header: {exc}") from exc
    if len(header) == 3:  # an earlier release: [meta, image, written_at]
        return header[0], header[1], header[2], False, unpacker.tell()
    meta_wire, _, written_at, has_image, *image_at = header
    return meta_wire, None, written_at, bool(has_image), image_at[0] if image_at else unpacker.tell()


def snapshot_data(data: Any) -> Any:
    """A snapshot's image, made or read when Raft holds only a handle to it (anything with
    ``load()``: a SnapshotFile, or pykv.replica.host.StateImage)."""
    load = getattr(data, "load", None)
    return load() if load is not None else data


@contextmanager
def open_image(data: Any) -> Iterator[BinaryIO | None]:
    """A snapshot's image as a binary file to stream from, whatever holds it: bytes, or a
    handle with ``open()`` (a file) or only ``load()``; None when there is no image."""
    opener = getattr(data, "open", None)
    if opener is not None:
        image = opener()
    else:
        loaded = snapshot_data(data)
        image = None if loaded is None else io.BytesIO(loaded)
    try:
        yield image
    finally:
        if image is not None:
            image.close()


@dataclass
class _Recovered:
    hard_state: HardState = field(default_factory=HardState)
    entries: list[Entry] = field(default_factory=list)
    snapshot: Snapshot | None = None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class NodeLog:
    """One node's durable Raft state for all its groups (not thread-safe: one writer)."""

    def __init__(self, data_dir: Path, *, fsync: str = "always", segment_bytes: int = 64 << 20) -> None:
        self.data_dir = Path(data_dir)
        self.snap_dir = self.data_dir / "snap"
        self.snap_dir.mkdir(parents=True, exist_ok=True)
        self.wal_dir = self.data_dir / "wal"
        self._fsync = fsync
        # group -> [(last entry index in the record, lsn)] of the records it may still need
        self._records: dict[int, deque[tuple[int, int]]] = {}
        self.recovered = self._recover()
        # Preallocated segments: a commit's fdatasync then has no file size to record
        # (WalWriter's docstring; benchmarks/bench_engine.py measures it).
        self.wal = WalWriter(str(self.wal_dir), fsync=fsync, segment_bytes=segment_bytes,
                             preallocate=fsync == "always")
        self._latest_hard: dict[int, HardState] = {
            g: r.hard_state for g, r in self.recovered.items()
        }
        # The snapshot each group's file holds: restated with the hard states (truncate), so
        # recovery can tell a lost snapshot file from a group that never had one.
        self._latest_snap: dict[int, SnapshotMeta] = {
            g: r.snapshot.meta for g, r in self.recovered.items() if r.snapshot is not None
        }

    # --- recovery ---------------------------------------------------------------------------

    def _recover(self) -> dict[int, _Recovered]:
        # A dropped group (this node left it) has a tombstone holding the WAL lsn of the drop:
        # records and snapshot files of the group from before it are ignored, so the group
        # can come back later from a clean slate.
        dropped = {
            int(path.stem[1:]): int(path.read_text() or 0)
            for path in self.snap_dir.glob("g*.dropped")
        }
        self.dropped = dict(dropped)
        groups: dict[int, _Recovered] = {}
        for path in self.snap_dir.glob("g*.snap"):
            group = int(path.stem[1:])
            with open(path, "rb") as f:
                meta_wire, _, written_at, _, _ = _read_header(f)
            if written_at < dropped.get(group, 0):
                continue
            meta = SnapshotMeta.from_wire(meta_wire)
            groups[group] = _Recovered(snapshot=Snapshot(meta, SnapshotFile(path, meta.index)))
        # Entries a group's snapshot file covers are dropped at the end: not decoded at all.
        covered = {g: rec.snapshot.meta.index for g, rec in groups.items() if rec.snapshot}
        records = read_wal(str(self.wal_dir)) if self.wal_dir.exists() else iter(())
        first = next(records, None)
        if first is None and groups:
            # The WAL is gone but snapshots are here: the node forgot its terms, votes and the
            # entries it acknowledged. Its replicas must not vote or count towards a commit
            # again (with them, a leader could be elected without a committed entry).
            raise CorruptData(
                f"{self.wal_dir} holds no record, but the snapshots of {len(groups)} groups are "
                "here: the node lost its Raft log (its terms, votes and acknowledged entries)"
            )
        marked: dict[int, int] = {}  # group -> index of the last snapshot the WAL records
        for record in itertools.chain([first] if first else [], records):
            for group, hs, entries, snap_meta in unpack(record.payload):
                if record.lsn <= dropped.get(group, 0):
                    continue
                rec = groups.setdefault(group, _Recovered())
                if snap_meta is not None:
                    # The snapshot file was fsync'd before this marker was written, and a
                    # file is only ever replaced by a newer snapshot: the log restarts here.
                    meta = SnapshotMeta.from_wire(snap_meta)
                    cut_through(rec.entries, meta.index)
                    marked[group] = meta.index
                if entries:
                    self._records.setdefault(group, deque()).append((entries[-1][1], record.lsn))
                    cut_from(rec.entries, entries[0][1])
                    floor = covered.get(group, 0)
                    if entries[-1][1] > floor:
                        rec.entries.extend(Entry.from_wire(e) for e in entries if e[1] > floor)
                if hs is not None:
                    rec.hard_state = HardState.from_wire(hs)
        self._check_snapshots_present(groups, marked)
        for group, rec in groups.items():
            if rec.snapshot is not None:
                offset = rec.snapshot.meta.index
                self.compacted(group, offset)
                rec.entries = [e for e in rec.entries if e.index > offset]
            # Keep only a contiguous run after the snapshot (older records may be deleted).
            start = rec.snapshot.meta.index + 1 if rec.snapshot else 1
            if rec.entries and rec.entries[0].index != start:
                rec.entries = [e for e in rec.entries if e.index >= start]
                if rec.entries and rec.entries[0].index != start:
                    rec.entries = []
        return groups

    def _check_snapshots_present(self, groups: dict[int, _Recovered], marked: dict[int, int]) -> None:
        # Without the snapshot its marker names, the group would restart from an empty log
        # (the entries before the marker are gone) and the entries after it would not
        # follow on: the node would forget entries it acknowledged.
        for group, index in marked.items():
            snapshot = groups[group].snapshot
            if snapshot is None or snapshot.meta.index < index:
                raise CorruptData(
                    f"{self._snap_path(group)} should hold the snapshot of group {group} at "
                    f"index {index}, which the WAL records, but "
                    + ("is missing" if snapshot is None else f"holds index {snapshot.meta.index}")
                )

    def persistent_state(self, group: int) -> PersistentState | None:
        """What group ``group`` restarts from, or None when this node never persisted it."""
        rec = self.recovered.get(group)
        if rec is None:
            return None
        return PersistentState(rec.hard_state, tuple(rec.entries), rec.snapshot)

    def release(self, group: int) -> None:
        """The group has taken its recovered state: let go of its log (the group holds it)."""
        self.recovered.pop(group, None)

    def groups(self) -> list[int]:
        """The groups found on disk and not yet released."""
        return sorted(self.recovered)

    # --- persisting -------------------------------------------------------------------------

    def save_snapshot(self, group: int, snapshot: Snapshot) -> SnapshotFile:
        """Write a snapshot file durably (temp file, fsync, rename, fsync the directory);
        the handle to its data."""
        path = self._snap_path(group)
        tmp = path.with_suffix(".tmp")
        written_at = self.wal.last_lsn if hasattr(self, "wal") else 0
        header = [snapshot.meta.to_wire(), None, written_at]
        roomy = getattr(snapshot.data, "roomy_file", None)
        if roomy is None or not self._adopt(roomy, pack([*header, True, HEADER_ROOM]), tmp):
            with open(tmp, "wb") as f, open_image(snapshot.data) as image:
                f.write(pack([*header, image is not None]))
                if image is not None:
                    shutil.copyfileobj(image, f, COPY_BYTES)  # a piece at a time
                f.flush()
                if self._fsync != "off":
                    os.fsync(f.fileno())
        os.replace(tmp, path)
        self._latest_snap[group] = snapshot.meta
        if self._fsync != "off":
            _fsync_dir(self.snap_dir)
        return self.snapshot_file(group, snapshot.meta.index)

    def _adopt(self, roomy: Path, header: bytes, tmp: Path) -> bool:
        """Make ``roomy`` (an image_file) a snapshot file at ``tmp`` without copying the
        image: the header goes into its room, then a second link to it. False if the
        header does not fit (the caller copies instead)."""
        if len(header) > HEADER_ROOM:
            return False
        with open(roomy, "r+b") as f:
            f.write(header)
            f.flush()
            if self._fsync != "off":
                os.fsync(f.fileno())  # the image's own bytes too
        tmp.unlink(missing_ok=True)
        os.link(roomy, tmp)
        return True

    def snapshot_file(self, group: int, index: int) -> SnapshotFile:
        """The handle to the group's saved snapshot at ``index``."""
        return SnapshotFile(self._snap_path(group), index)

    def _snap_path(self, group: int) -> Path:
        return self.snap_dir / f"g{group}.snap"

    def persist(self, work: Iterable[GroupWork], *, wait: bool = True) -> int:
        """Write a batch: snapshot files first, then one WAL record. Returns its lsn.

        With ``wait`` it blocks until fsync'd (the WAL writer releases the GIL), so callers
        run it off the event loop thread; without, the record rides on the next group commit.
        """
        rows = []
        for w in work:
            if w.snapshot is not None:
                self.save_snapshot(w.group, w.snapshot)
            if w.hard_state is None and not w.entries and w.snapshot is None:
                continue
            rows.append(
                [
                    w.group,
                    None if w.hard_state is None else w.hard_state.to_wire(),
                    [e.to_wire() for e in w.entries],
                    None if w.snapshot is None else w.snapshot.meta.to_wire(),
                ]
            )
            if w.hard_state is not None:
                self._latest_hard[w.group] = w.hard_state
        if not rows:
            return self.wal.last_lsn
        lsn = self.wal.append(pack(rows)) if wait else self.wal.submit(pack(rows))
        for w in work:
            if w.entries:
                self._records.setdefault(w.group, deque()).append((w.entries[-1].index, lsn))
        return lsn

    def drop(self, group: int) -> None:
        """This node left the group: forget its log and snapshot (durably, tombstone first)."""
        lsn = self.wal.append(pack([[group, None, [], None]]))  # a marker to date the drop
        path = self.snap_dir / f"g{group}.dropped"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(str(lsn))
        if self._fsync != "off":
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        self._snap_path(group).unlink(missing_ok=True)
        if self._fsync != "off":
            _fsync_dir(self.snap_dir)
        self.dropped[group] = lsn
        self._records.pop(group, None)
        self._latest_hard.pop(group, None)
        self._latest_snap.pop(group, None)
        self.recovered.pop(group, None)

    def compacted(self, group: int, index: int) -> None:
        """Group ``group`` holds a durable snapshot at ``index``: older entries are garbage."""
        records = self._records.get(group)
        while records and records[0][0] <= index:
            records.popleft()

    def wal_status(self) -> dict[str, int]:
        """How long the WAL is: its segments and their bytes."""
        sizes = self.wal.segment_sizes()
        return {"segments": len(sizes), "bytes": sum(sizes.values())}

    def pinning(self, max_segments: int) -> list[int]:
        """The groups that keep the WAL longer than ``max_segments`` segments: a snapshot of
        each lets truncate() delete the segments before the last ``max_segments``."""
        segments = self.wal.segments()
        if len(segments) <= max_segments:
            return []
        keep_from = segments[-max_segments]
        return [group for group, records in self._records.items() if records and records[0][1] < keep_from]

    def truncate(self) -> int:
        """Delete WAL segments no group needs any more; return how many were deleted."""
        needed = [r[0][1] for r in self._records.values() if r]
        floor = min(needed, default=self.wal.last_lsn + 1)
        if floor <= 1 or len(self.wal.segments()) < 2:
            return 0
        # Restate every hard state and snapshot marker first, so deleting old records loses
        # none of them.
        rows = []
        for group in sorted(self._latest_hard.keys() | self._latest_snap.keys()):
            hard, snap = self._latest_hard.get(group), self._latest_snap.get(group)
            rows.append([group, hard and hard.to_wire(), [], snap and snap.to_wire()])
        self.wal.append(pack(rows))
        return self.wal.truncate_before(floor)

    def close(self) -> None:
        self.wal.close()
