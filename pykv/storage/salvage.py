"""Salvage a store that refuses to open because of damage in the middle of its WAL.

A flipped bit in an acknowledged record makes ``Storage.open`` refuse the store (cutting the
log there would silently drop every later commit). ``salvage(source, target)`` makes a copy
that opens: each damaged record of the copy is overwritten by a filler record of the same
length (record.KIND_FILLER: no update), so every later record keeps its lsn and offset, and
the hint file stays valid. What is lost is exactly the transactions of the damaged records:
their keys keep the version before them, or, if the hint checkpointed them, read as damaged
(CorruptData; ``pykv check`` lists them, and they can be deleted or written again).

How many records a damaged span held is known when its length field survived (the usual
case, a flipped bit in a payload) or when it is the only span of a sealed segment (the next
segment's name gives the count); otherwise salvage refuses rather than guess. The source is
only read, under its directory lock.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pykv._engine.wal import (
    check_segment_header,
    crc32c,
    damaged_spans,
    list_segments,
    segment_header,
    segment_path,
)
from pykv.errors import CorruptData, InvalidArgument
from pykv.storage.files import (
    DirectoryLock,
    copy_durably,
    fsync_dir,
    make_dirs_durably,
    new_store_directory,
    refuse_node_directory,
)
from pykv.storage.hint import read_hint
from pykv.storage.record import FILLER_PAYLOAD

_FRAME = struct.Struct("<II")  # a WAL record's length and crc32c
HEADER_BYTES = len(segment_header(1))
# The smallest record salvage writes: a frame and the filler's kind byte.
MIN_FILLER = _FRAME.size + len(FILLER_PAYLOAD)


@dataclass(frozen=True)
class DamagedSpan:
    """Bytes of one segment that held records no longer readable, and what replaced them."""

    segment: int  # the segment's id (the lsn of its first record)
    start: int  # byte offsets in the segment file
    stop: int
    first_lsn: int  # the lsn of the first record lost here
    records: int  # how many records it held (each now a filler)


@dataclass
class SalvageReport:
    """What salvage found and did."""

    segments: int = 0
    records: int = 0  # readable records kept
    damaged: list[DamagedSpan] = field(default_factory=list)
    headers_rewritten: list[int] = field(default_factory=list)  # segments with a damaged header
    hint_dropped: bool = False  # the hint was damaged; the copy replays the whole WAL

    @property
    def lost_records(self) -> int:
        return sum(span.records for span in self.damaged)


def salvage(source: str | Path, target: str | Path,
            progress: Callable[[int, int], None] | None = None) -> SalvageReport:
    """Copy the store in ``source`` to the new directory ``target``, with each damaged WAL
    record replaced by a filler record. ``progress(segments done, segments)``. Raises
    InvalidArgument for a target that is not empty, StoreLocked while the source is open,
    CorruptData when the damage cannot be mended without guessing."""
    source, target = Path(source), Path(target)
    if not (source / "wal").is_dir():
        raise InvalidArgument(f"{source} is not a store's directory (it has no wal/)")
    refuse_node_directory(str(source))
    new_store_directory(str(target), "salvage")
    lock = DirectoryLock(str(source), shared=True)  # nobody writes the source while it is copied
    try:
        _copy_store(source, target)
    finally:
        lock.release()
    report = SalvageReport()
    wal_dir = str(target / "wal")
    ids = list_segments(wal_dir)
    report.segments = len(ids)
    for index, segment_id in enumerate(ids):
        next_id = ids[index + 1] if index + 1 < len(ids) else None
        _mend_segment(wal_dir, segment_id, next_id, report)
        if progress is not None:
            progress(index + 1, len(ids))
    _check_hint(target, ids, report)
    fsync_dir(wal_dir)
    return report


def _copy_store(source: Path, target: Path) -> None:
    """Every file of the store but its lock and leftovers of an unfinished write."""
    make_dirs_durably(str(target / "wal"))
    copies = [(str(path), str(target / path.relative_to(source)), None)
              for path in [*source.iterdir(), *(source / "wal").iterdir()]
              if not path.is_dir() and path.name != "LOCK" and not path.name.endswith(".tmp")]
    copy_durably(copies)


def _mend_segment(wal_dir: str, segment_id: int, next_id: int | None, report: SalvageReport) -> None:
    path = segment_path(wal_dir, segment_id)
    with open(path, "rb") as f:
        data = f.read()
    header_rewritten = False
    try:
        check_segment_header(data[:HEADER_BYTES], segment_id, path)
    except CorruptData:
        # Its name says everything the header holds.
        data = segment_header(segment_id) + data[HEADER_BYTES:]
        report.headers_rewritten.append(segment_id)
        header_rewritten = True
    spans, records, end = damaged_spans(data, segment_id)
    report.records += records
    if next_id is not None and end < len(data):
        spans.append((end, len(data), records))  # a sealed segment holds records only: the rest is lost
    counts = _records_per_span(segment_id, spans, records, next_id, data)
    if not spans and not header_rewritten:
        return
    mended = bytearray(data)
    lost_before = 0  # records of the damaged spans before this one
    for (start, stop, valid_before), count in zip(spans, counts, strict=True):
        mended[start:stop] = _fillers(stop - start, count)
        first_lsn = segment_id + valid_before + lost_before
        report.damaged.append(DamagedSpan(segment_id, start, stop, first_lsn, count))
        lost_before += count
    with open(path, "rb+") as f:
        f.write(mended)
        os.fsync(f.fileno())


def _records_per_span(segment_id: int, spans: list[tuple[int, int, int]], records: int,
                      next_id: int | None, data: bytes) -> list[int]:
    """How many records each damaged span held: one per span whose first length field
    reaches exactly its end, the rest from the next segment's first lsn (sealed segments)."""
    counts = [1 if _length_fits(data, start, stop) else 0 for start, stop, _ in spans]
    unknown = [i for i, count in enumerate(counts) if count == 0]
    if not unknown:
        if next_id is not None and records + sum(counts) != next_id - segment_id:
            raise CorruptData(f"segment {segment_id}: {records} records and {len(spans)} "
                              f"damaged ones, but the next segment starts at lsn {next_id}")
        return counts
    if next_id is None or len(unknown) > 1:
        where = ", ".join(f"bytes {spans[i][0]}-{spans[i][1]}" for i in unknown)
        raise CorruptData(f"segment {segment_id}: cannot tell how many records the damaged "
                          f"{where} held (their length fields are damaged too)")
    counts[unknown[0]] = next_id - segment_id - records - sum(counts)
    start, stop, _ = spans[unknown[0]]
    if counts[unknown[0]] < 1 or counts[unknown[0]] * MIN_FILLER > stop - start:
        raise CorruptData(f"segment {segment_id}: the damaged bytes {start}-{stop} cannot "
                          f"have held the {counts[unknown[0]]} records the next segment's "
                          "name implies")
    return counts


def _length_fits(data: bytes, start: int, stop: int) -> bool:
    length = _FRAME.unpack_from(data, start)[0] & 0x7FFFFFFF
    return start + _FRAME.size + length == stop


def _fillers(size: int, count: int) -> bytes:
    """``count`` filler records filling exactly ``size`` bytes (the last takes the rest)."""
    out = bytearray()
    for index in range(count):
        room = size - len(out) if index == count - 1 else MIN_FILLER
        payload = FILLER_PAYLOAD + bytes(room - MIN_FILLER)
        length = struct.pack("<I", len(payload))
        out += length + struct.pack("<I", crc32c(length + payload)) + payload
    return bytes(out)


def _check_hint(target: Path, ids: list[int], report: SalvageReport) -> None:
    """Read the hint through: a damaged one is dropped while the WAL still holds every
    record from the first (then replay rebuilds everything); else salvage cannot help."""
    path = target / "hint"
    try:
        hint = read_hint(str(path))
        if hint is not None:
            for _ in hint[1]:
                pass
    except CorruptData as exc:
        if ids and ids[0] != 1:
            raise CorruptData(f"{exc}, and the WAL no longer holds the records before lsn "
                              f"{ids[0]} (compacted): the keys it checkpointed are lost") from None
        os.unlink(path)
        report.hint_dropped = True
