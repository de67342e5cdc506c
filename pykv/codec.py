"""Byte encodings shared by the log, the snapshots and the wire (msgpack, zstd for big values)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, TypeVar

import msgpack
import zstandard

from pykv.errors import CorruptData
from pykv.types import MAX_VALUE_BYTES, Value, check_encoded_size, check_value

T = TypeVar("T")

# Values at least this large are zstd-compressed when that saves space.
COMPRESS_THRESHOLD = 4096
_RAW = b"\x00"
_ZSTD = b"\x01"

def per_thread(make: Callable[[], T]) -> Callable[[], T]:
    """A getter of this thread's own ``make()``, made at its first call in each thread: for
    objects that are costly to make and not safe to share between threads."""
    mine = threading.local()

    def get() -> T:
        try:
            return mine.value
        except AttributeError:
            mine.value = make()
            return mine.value

    return get


# zstd contexts, one pair per thread: a context is not thread-safe (zstandard releases the
# GIL while it works), and one shared by the store's threads made wrong output, CorruptData
# on reads and segfaults (8 threads writing 4-120 KB values: 2 crashes in 3 runs).
zstd_compressor = per_thread(lambda: zstandard.ZstdCompressor(level=1))
zstd_decompressor = per_thread(zstandard.ZstdDecompressor)


def pack(obj: Any) -> bytes:
    """Encode a structure of dicts, lists, ints, str and bytes (msgpack, bin type for bytes)."""
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes) -> Any:
    """Decode what pack() produced; raise CorruptData on garbage."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise CorruptData(f"undecodable msgpack ({len(data)} bytes): {exc}") from exc


def stream_unpacker(source: BinaryIO) -> msgpack.Unpacker:
    """An Unpacker of the pack()ed objects written back to back into a binary file, reading
    it a piece at a time (its ``tell()``: where the objects read so far end). Iterating it
    raises one of UNPACK_ERRORS on garbage."""
    return msgpack.Unpacker(source, raw=False, strict_map_key=False,
                            max_buffer_size=_MAX_STREAM_OBJECT)


UNPACK_ERRORS = (ValueError, msgpack.FormatError, msgpack.StackError, msgpack.BufferFull)


def unpack_stream(source: BinaryIO) -> Iterator[Any]:
    """Decode, one by one, the pack()ed objects written back to back into a binary file,
    reading it a piece at a time; raise CorruptData on garbage."""
    try:
        yield from stream_unpacker(source)
    except UNPACK_ERRORS as exc:
        raise CorruptData(f"undecodable msgpack stream: {exc}") from exc


# The largest object unpack_stream() accepts: big enough for any run a writer packs.
_MAX_STREAM_OBJECT = 1 << 30


def encode_value(value: Value, limit: int = MAX_VALUE_BYTES) -> bytes:
    """Check a user value against DESIGN §1 and encode it; raises InvalidValue/ValueTooLarge."""
    check_value(value)
    body = pack(value)
    check_encoded_size(body, limit)
    if len(body) >= COMPRESS_THRESHOLD:
        small = zstd_compressor().compress(body)
        if len(small) < len(body):
            return _ZSTD + small
    return _RAW + body


def check_value_fits(value: Value, limit: int = MAX_VALUE_BYTES) -> int:
    """encode_value()'s checks without its work: InvalidValue, or ValueTooLarge past limit.
    Returns size_bound(value), which a transaction counts towards max_txn_bytes.

    The value is encoded only when a cheap upper bound of its size is over the limit, so a
    put does not pay for msgpack (and zstd) twice: once here, once when it is committed.
    """
    check_value(value)
    bound = size_bound(value)
    if bound > limit:
        check_encoded_size(pack(value), limit)
    return bound


def size_bound(value: object) -> int:
    """An upper bound of value's msgpack size, without encoding it."""
    if type(value) is str:
        # UTF-8 takes at most 4 bytes a character, and 1 for ASCII (a flag CPython keeps).
        return 5 + (len(value) if value.isascii() else 4 * len(value))  # type: ignore[union-attr,arg-type]
    if type(value) is bytes:
        return 5 + len(value)  # type: ignore[arg-type]
    if type(value) is list:
        return 5 + sum(size_bound(item) for item in value)  # type: ignore[union-attr]
    return 9


def decode_value(data: bytes) -> Value:
    """Decode what encode_value() produced."""
    tag, body = data[:1], data[1:]
    if tag == _RAW:
        return unpack(body)
    if tag == _ZSTD:
        try:
            return unpack(zstd_decompressor().decompress(body))
        except zstandard.ZstdError as exc:
            raise CorruptData(f"bad zstd value: {exc}") from exc
    raise CorruptData(f"unknown value encoding tag {tag!r}")
