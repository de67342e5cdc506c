"""Wire framing, sans-I/O: frame encoding, an incremental decoder, and the version handshake.

A frame on the wire::

    [u32 length, big-endian][u8 kind | 0x80 if zstd][payload: `length` bytes]

The payload is msgpack of ``[request_id, body]`` (zstd-compressed when the flag is set),
so one connection carries many requests at once: a response carries the id of its
request. Request id 0 means "no reply expected" (a one-way message). Kinds 0-15 are the
protocol's own (HELLO, RESPONSE, ERROR); applications use 16-127.

The first frame each side sends is HELLO with body ``[b"PYKV", protocol_version]``, or
``[b"PYKV", protocol_version, cluster_id]`` from a connecting side that knows which cluster
it belongs to (a node, or a client once it has learned it): the accepting side refuses one of
another cluster (pykv.net.protocol says who sends first).

Every malformed input raises :class:`pykv.errors.ProtocolError` with a message that says
what was wrong; after one, a decoder refuses further input (the stream lost sync).
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

import msgpack
import zstandard

from pykv.codec import per_thread, zstd_compressor, zstd_decompressor
from pykv.errors import ProtocolError, WrongCluster

PROTOCOL_VERSION = 1
MAGIC = b"PYKV"

# Kinds reserved by the protocol; applications use FIRST_APP_KIND..MAX_KIND.
HELLO = 0
RESPONSE = 1
ERROR = 2
FIRST_APP_KIND = 16
MAX_KIND = 0x7F
_ZSTD_FLAG = 0x80

HEADER = struct.Struct(">IB")
DEFAULT_MAX_FRAME = 16 << 20
# The largest frame a cluster's nodes and clients send and accept unless told otherwise: a
# transaction of pykv.types.MAX_TXN_BYTES in one shard fits in one request and one Raft
# entry, with room for its keys and clocks.
CLUSTER_MAX_FRAME = 64 << 20
# Payloads at least this large are compressed, when that makes them smaller.
DEFAULT_COMPRESS_THRESHOLD = 8 << 10

# A Packer per thread, reused: msgpack.packb builds a new one per call, which costs more
# than packing a small frame; a Packer is not safe to share between threads.
_packer = per_thread(lambda: msgpack.Packer(use_bin_type=True))


def _packb(obj: Any) -> bytes:
    return _packer().pack(obj)


class Frame(NamedTuple):
    """One decoded frame: its kind, the id that pairs a response with its request, a body.

    (A named tuple: built for every frame received, it costs half a frozen dataclass.)
    """

    kind: int
    request_id: int
    body: Any


def encode_frame(
    kind: int,
    body: Any,
    *,
    request_id: int = 0,
    max_frame: int = DEFAULT_MAX_FRAME,
    compress_threshold: int = DEFAULT_COMPRESS_THRESHOLD,
) -> bytes:
    """The bytes of one frame. Raises ProtocolError for a bad kind or an oversized frame."""
    if not (isinstance(kind, int) and 0 <= kind <= MAX_KIND):
        raise ProtocolError(f"frame kind must be an int in 0..{MAX_KIND}, got {kind!r}")
    try:
        payload = _packb([request_id, body])
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"frame body of kind {kind} cannot be encoded: {exc}") from exc
    if len(payload) > max_frame:  # the receiver's limit is on the payload as decompressed
        raise ProtocolError(
            f"frame of kind {kind} has a {len(payload)}-byte payload; max_frame is {max_frame}"
        )
    flags = 0
    if len(payload) >= compress_threshold:
        small = zstd_compressor().compress(payload)
        if len(small) < len(payload):
            payload, flags = small, _ZSTD_FLAG
    return HEADER.pack(len(payload), kind | flags) + payload


def hello_frame(version: int = PROTOCOL_VERSION, cluster: str | None = None) -> bytes:
    """The handshake frame each side sends first (``cluster``: the id of this side's cluster,
    if it knows it)."""
    return encode_frame(HELLO, [MAGIC, version] if cluster is None else [MAGIC, version, cluster])


def check_hello(frame: Frame, version: int = PROTOCOL_VERSION, cluster: str | None = None) -> str | None:
    """The peer's cluster id (None if it named none). Raises ProtocolError unless the frame
    is a HELLO for the same protocol version, WrongCluster if both sides name a cluster and
    they differ."""
    if frame.kind != HELLO:
        raise ProtocolError(f"expected a HELLO frame first, got kind {frame.kind}")
    body = frame.body
    if not (isinstance(body, list) and len(body) in (2, 3) and body[0] == MAGIC):
        raise ProtocolError(f"HELLO frame without the {MAGIC!r} magic: {body!r:.80}")
    if body[1] != version:
        raise ProtocolError(
            f"protocol version mismatch: peer speaks {body[1]!r}, this side speaks {version}"
        )
    peer_cluster = body[2] if len(body) == 3 else None
    if peer_cluster is not None and not isinstance(peer_cluster, str):
        raise ProtocolError(f"HELLO frame with a cluster id that is not a str: {peer_cluster!r:.80}")
    if cluster is not None and peer_cluster is not None and peer_cluster != cluster:
        raise WrongCluster(
            f"cluster {peer_cluster!r} (the connecting side) is not cluster {cluster!r} (the "
            "accepting side)"
        )
    return peer_cluster


class FrameDecoder:
    """Turns a byte stream, split or coalesced anyhow, into frames.

    ``feed(data)`` returns every frame completed by ``data``. A frame longer than
    ``max_frame`` is refused as soon as its header arrives, before its payload is
    buffered; a decompressed payload is bounded by ``max_frame`` too.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received that do not yet form a whole frame."""
        return len(self._buffer)

    @property
    def error(self) -> ProtocolError | None:
        """The error that stopped this decoder, if any."""
        return self._error

    def feed(self, data: bytes) -> list[Frame]:
        """Frames completed by data. Raises ProtocolError on malformed input.

        Whole frames that precede the bad input in ``data`` are still returned; the error
        is then raised by the next call (check ``error`` to learn of it at once).
        """
        if self._error is not None:
            raise ProtocolError(f"decoder already failed: {self._error}")
        frames: list[Frame] = []
        try:
            self._parse(data, frames)
        except ProtocolError:
            if not frames:
                raise
        return frames

    def _parse(self, data: bytes, frames: list[Frame]) -> None:
        buf = self._buffer
        buf += data
        pos = 0
        end_of_data = len(buf)
        while end_of_data - pos >= HEADER.size:
            length, kind_byte = HEADER.unpack_from(buf, pos)
            if length > self.max_frame:
                self._fail(
                    f"frame length {length} exceeds max_frame {self.max_frame} "
                    f"(kind byte {kind_byte:#04x})"
                )
            end = pos + HEADER.size + length
            if end > end_of_data:
                break
            frames.append(self._decode(kind_byte, buf[pos + HEADER.size : end]))
            pos = end
        if pos:
            del buf[:pos]

    def check_eof(self) -> None:
        """Call when the stream ends: raises ProtocolError if it ended inside a frame."""
        if self._buffer:
            detail = ""
            if len(self._buffer) >= HEADER.size:
                length, _ = HEADER.unpack_from(self._buffer)
                detail = f" of {HEADER.size + length}"
            self._fail(f"stream ended inside a frame: {len(self._buffer)}{detail} bytes received")

    def _fail(self, message: str) -> None:
        self._error = ProtocolError(message)
        self._buffer.clear()
        raise self._error

    def _decode(self, kind_byte: int, payload: bytes | bytearray) -> Frame:
        kind = kind_byte & MAX_KIND
        if kind_byte & _ZSTD_FLAG:
            payload = self._decompress(kind, payload)
        try:
            envelope = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        except Exception as exc:  # msgpack raises many types on garbage; all mean the same
            self._fail(
                f"frame of kind {kind}: undecodable msgpack payload ({type(exc).__name__}: {exc})"
            )
        if not (
            isinstance(envelope, list)
            and len(envelope) == 2
            and isinstance(envelope[0], int)
            and not isinstance(envelope[0], bool)
            and 0 <= envelope[0] < 1 << 64
        ):
            self._fail(f"frame of kind {kind}: payload is not [request_id, body]: {envelope!r:.80}")
        return Frame(kind, envelope[0], envelope[1])

    def _decompress(self, kind: int, payload: bytes | bytearray) -> bytes:
        # zstandard honours max_output_size only for frames that do not declare their
        # size, so a declared size is checked first (a zip bomb must not be allocated).
        try:
            declared = zstandard.frame_content_size(payload)
            if declared > self.max_frame:
                self._fail(
                    f"frame of kind {kind} declares {declared} bytes uncompressed; "
                    f"max_frame is {self.max_frame}"
                )
            data = zstd_decompressor().decompress(payload, max_output_size=self.max_frame)
        except zstandard.ZstdError as exc:
            self._fail(f"frame of kind {kind}: bad zstd payload: {exc}")
        if len(data) > self.max_frame:
            self._fail(f"frame of kind {kind} decompresses past max_frame {self.max_frame}")
        return data
