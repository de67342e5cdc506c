"""The hint file: a checkpoint of the key directory, so that restart replays only the WAL tail.

Format (little-endian):

    b"PYKVHINT" | u32 version | u64 checkpoint_lsn
    msgpack stream of [key, segment_id, offset, size, meta, lsn], one per live key, key order
    u64 entry count | u32 crc32c of every byte before it

Every WAL record with lsn <= checkpoint_lsn is reflected in the entries; records after it are
replayed on open. The file is written as ``hint.tmp``, fsync'd, renamed over ``hint`` and the
directory fsync'd, so a crash leaves the old hint or the new one, never a mix.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Iterator

import msgpack

from pykv._engine.wal import crc32c
from pykv.errors import CorruptData
from pykv.storage.failpoints import failpoint
from pykv.storage.files import fsync_dir

MAGIC = b"PYKVHINT"
VERSION = 1
_HEADER = struct.Struct("<8sIQ")
_TRAILER = struct.Struct("<QI")
_CHUNK = 1 << 20

HintEntry = tuple[bytes, int, int, int, bytes, int]  # key, segment, offset, size, meta, lsn


def write_hint(path: str, checkpoint_lsn: int, entries: Iterable[HintEntry],
               before_rename: Callable[[], None] | None = None) -> int:
    """Write a hint file atomically; returns the number of entries written.

    before_rename runs after the temp file is fsync'd and before it replaces the old hint (the
    caller waits there until every record the entries point at is durable).
    """
    tmp = path + ".tmp"
    packer = msgpack.Packer(use_bin_type=True)
    count = 0
    with open(tmp, "wb") as f:
        head = _HEADER.pack(MAGIC, VERSION, checkpoint_lsn)
        crc = crc32c(head)
        f.write(head)
        buffered: list[bytes] = []
        size = 0
        for entry in entries:
            chunk = packer.pack(list(entry))
            buffered.append(chunk)
            size += len(chunk)
            count += 1
            if size >= _CHUNK:
                crc = _flush(f, buffered, crc)
                buffered, size = [], 0
        crc = _flush(f, buffered, crc)
        tail = struct.pack("<Q", count)
        crc = crc32c(tail, crc)
        f.write(tail + struct.pack("<I", crc))
        f.flush()
        os.fsync(f.fileno())
    if before_rename is not None:
        before_rename()
    failpoint("storage.checkpoint.before_rename")
    os.rename(tmp, path)
    failpoint("storage.checkpoint.after_rename")
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return count


def _flush(f, buffered: list[bytes], crc: int) -> int:
    data = b"".join(buffered)
    f.write(data)
    return crc32c(data, crc)


def read_hint(path: str) -> tuple[int, Iterator[HintEntry]] | None:
    """Open a hint file: (checkpoint_lsn, entries), or None when there is none.

    The entries are streamed; the checksum and the count are verified when the iterator is
    exhausted, and a mismatch raises CorruptData (a hint is renamed into place only whole, so a
    bad one means the disk corrupted it, and the WAL before its lsn may already be gone).
    """
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return None
    total = os.fstat(f.fileno()).st_size
    if total < _HEADER.size + _TRAILER.size:
        f.close()
        raise CorruptData(f"hint file {path} is {total} bytes, shorter than its header")
    head = f.read(_HEADER.size)
    magic, version, checkpoint_lsn = _HEADER.unpack(head)
    if magic != MAGIC or version != VERSION:
        f.close()
        raise CorruptData(f"{path} is not a version {VERSION} pykv hint file")
    return checkpoint_lsn, _entries(f, path, head, total)


def _entries(f, path: str, head: bytes, total: int) -> Iterator[HintEntry]:
    with f:
        crc = crc32c(head)
        remaining = total - _HEADER.size - _TRAILER.size
        unpacker = msgpack.Unpacker(raw=False, use_list=False, max_buffer_size=0)
        count = 0
        while remaining > 0:
            data = f.read(min(_CHUNK, remaining))
            if not data:
                raise CorruptData(f"hint file {path} ended early")
            remaining -= len(data)
            crc = crc32c(data, crc)
            unpacker.feed(data)
            try:
                for item in unpacker:
                    count += 1
                    yield item
            except (ValueError, msgpack.FormatError, msgpack.StackError) as exc:
                raise CorruptData(f"hint file {path} has an undecodable entry: {exc}") from exc
        trailer = f.read(_TRAILER.size)
        expected_count, expected_crc = _TRAILER.unpack(trailer)
        crc = crc32c(trailer[:8], crc)
        if crc != expected_crc or count != expected_count:
            raise CorruptData(f"hint file {path} failed its checksum; refusing to guess the key directory")
