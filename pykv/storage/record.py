"""Layout of the storage records inside WAL payloads: commits and compaction relocations.

A commit is ONE WAL record holding every key update of a transaction, so it is atomic by
construction: recovery either replays the whole record or cuts it as a torn tail. The payload
keeps the value bytes raw and concatenated after a small msgpack header, so that a reader
fetches one value with one ``os.pread`` at a computable offset and never decodes the record:

    u8 kind | u32 header_len | header (msgpack list of entries) | value bytes, concatenated

Commit entry:      [key, size, meta]            size -1 = delete (no value bytes)
Relocation entry:  [key, size, meta, orig_lsn]  a live value moved by compaction

A filler record (``u8 KIND_FILLER`` then anything) holds no update: ``pykv salvage`` writes
one over each damaged record of a store's copy, keeping every later record's lsn and offset.

``meta`` is what the key directory stores in its ``clock`` field for the key: the update's
timestamp (u64), the CRC32C of the value bytes (u32), then the vector clock bytes. Keeping the
checksum next to the location lets every read verify its value (bitcask does the same).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NamedTuple

from pykv._engine.wal import crc32c
from pykv.codec import pack, unpack
from pykv.errors import CorruptData

KIND_COMMIT = 1
KIND_RELOCATE = 2
KIND_FILLER = 3

_HEAD = struct.Struct("<BI")
FILLER_PAYLOAD = bytes([KIND_FILLER])  # a filler's first byte; the smallest one is this alone
_META = struct.Struct("<QI")
HEAD_BYTES = _HEAD.size
META_FIXED_BYTES = _META.size
DELETED = -1


class Entry(NamedTuple):
    """One key of a decoded record: where its value sits inside the payload, and its meta.

    (A NamedTuple, not a frozen dataclass: one is built per key on every commit and every
    replayed record, and a tuple is several times cheaper to make.)
    """

    key: bytes
    value_pos: int  # offset of the value bytes inside the payload; -1 for a delete
    size: int  # value length; -1 for a delete
    meta: bytes
    orig_lsn: int  # relocations: the lsn of the version that was moved; 0 for commits


def make_meta(timestamp: int, value: bytes, clock: bytes) -> bytes:
    """The key directory's per-key metadata: timestamp, value checksum, vector clock."""
    return _META.pack(timestamp, crc32c(value)) + clock


def split_meta(meta: bytes) -> tuple[int, int, bytes]:
    """Inverse of make_meta: (timestamp, value crc32c, clock bytes)."""
    timestamp, crc = _META.unpack_from(meta)
    return timestamp, crc, meta[META_FIXED_BYTES:]


def encode_commit(updates: Sequence[tuple[bytes, bytes | None, bytes, int]]) -> tuple[bytes, list[Entry]]:
    """Encode (key, value or None, clock, timestamp) updates as one commit payload.

    Returns the payload and one Entry per update, in order, with its value position.
    """
    header = []
    values = []
    for key, value, clock, timestamp in updates:
        if value is None:
            header.append([key, DELETED, _META.pack(timestamp, 0) + clock])
        else:
            header.append([key, len(value), make_meta(timestamp, value, clock)])
            values.append(value)
    return _assemble(KIND_COMMIT, header, values)


def encode_relocation(moves: Sequence[tuple[bytes, bytes, bytes, int]]) -> tuple[bytes, list[Entry]]:
    """Encode (key, value, meta, orig_lsn) live values that compaction copies forward."""
    header = [[key, len(value), meta, orig_lsn] for key, value, meta, orig_lsn in moves]
    return _assemble(KIND_RELOCATE, header, [value for _, value, _, _ in moves])


def _assemble(kind: int, header: list[list], values: list[bytes]) -> tuple[bytes, list[Entry]]:
    packed = pack(header)
    payload = b"".join([_HEAD.pack(kind, len(packed)), packed, *values])
    return payload, _entries(kind, header, HEAD_BYTES + len(packed))


def _entries(kind: int, header: list, values_start: int) -> list[Entry]:
    entries = []
    pos = values_start
    for item in header:
        key, size, meta = item[0], item[1], item[2]
        orig_lsn = item[3] if kind == KIND_RELOCATE else 0
        if size == DELETED:
            entries.append(Entry(key, DELETED, DELETED, meta, orig_lsn))
        else:
            entries.append(Entry(key, pos, size, meta, orig_lsn))
            pos += size
    return entries


def decode(payload: bytes) -> tuple[int, list[Entry]]:
    """Decode the header of a record payload (never the values): (kind, entries)."""
    if payload[:1] == FILLER_PAYLOAD:
        return KIND_FILLER, []
    if len(payload) < HEAD_BYTES:
        raise CorruptData(f"storage record of {len(payload)} bytes is shorter than its header")
    kind, header_len = _HEAD.unpack_from(payload)
    if kind not in (KIND_COMMIT, KIND_RELOCATE):
        raise CorruptData(f"unknown storage record kind {kind}")
    values_start = HEAD_BYTES + header_len
    header = unpack(bytes(memoryview(payload)[HEAD_BYTES:values_start]))
    entries = _entries(kind, header, values_start)
    end = max((e.value_pos + e.size for e in entries if e.size >= 0), default=values_start)
    if end != len(payload):
        raise CorruptData(f"storage record header describes {end} bytes but the payload has {len(payload)}")
    return kind, entries
