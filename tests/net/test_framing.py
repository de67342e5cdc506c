"""The frame decoder survives any split of a valid stream and any garbage, with clear errors."""

from __future__ import annotations

import os
import struct
from concurrent.futures import ThreadPoolExecutor

import msgpack
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from pykv.errors import ProtocolError, WrongCluster
from pykv.net.framing import (
    HEADER,
    HELLO,
    MAGIC,
    PROTOCOL_VERSION,
    Frame,
    FrameDecoder,
    check_hello,
    encode_frame,
    hello_frame,
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.text(max_size=30),
    st.binary(max_size=60),
)
bodies = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)
frames = st.lists(
    st.tuples(st.integers(0, 127), st.integers(0, 2**64 - 1), bodies), min_size=1, max_size=12
)


def decode_all(chunks, max_frame=1 << 20):
    decoder = FrameDecoder(max_frame=max_frame)
    out = []
    for chunk in chunks:
        out.extend(decoder.feed(chunk))
    decoder.check_eof()
    return out


def test_a_frame_round_trips():
    wire = encode_frame(20, {"k": "v", "n": [1, 2]}, request_id=7)
    length, kind = HEADER.unpack_from(wire)
    assert (length, kind) == (len(wire) - 5, 20)
    assert decode_all([wire]) == [Frame(20, 7, {"k": "v", "n": [1, 2]})]


def test_threads_encoding_at_once_get_their_own_bytes():
    def encode(n):
        return [encode_frame(16, [n, i, "x" * (i % 50)], request_id=i) for i in range(5000)]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(encode, range(4)))
    for n, wires in enumerate(results):
        assert decode_all(wires) == [Frame(16, i, [n, i, "x" * (i % 50)]) for i in range(5000)]


@settings(deadline=None, max_examples=150)
@given(st.integers(16, 127), st.integers(0, 2**64 - 1), bodies)
def test_the_wire_bytes_are_the_header_and_plain_msgpack(kind, request_id, body):
    """The format every release speaks: [u32 length][u8 kind] msgpack([request_id, body])."""
    payload = msgpack.packb([request_id, body], use_bin_type=True)
    wire = encode_frame(kind, body, request_id=request_id)
    assert wire == HEADER.pack(len(payload), kind) + payload


@settings(deadline=None, max_examples=150)
@given(frames=frames, data=st.data())
def test_any_split_of_a_stream_decodes_to_the_same_frames(frames, data):
    wire = b"".join(encode_frame(k, b, request_id=r, compress_threshold=64) for k, r, b in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=20)))
    chunks = [wire[a:b] for a, b in zip([0] + cuts, cuts + [len(wire)], strict=True)]
    decoded = decode_all(chunks)
    expected = [Frame(k, r, b) for k, r, b in frames]
    assert decoded == expected
    assert decode_all([wire[i : i + 1] for i in range(len(wire))]) == expected


def test_large_payloads_are_compressed_and_restored():
    body = {"blob": b"x" * 100_000}
    wire = encode_frame(30, body, request_id=1)
    assert len(wire) < 10_000
    assert decode_all([wire]) == [Frame(30, 1, body)]
    incompressible = os.urandom(20_000)
    assert len(encode_frame(30, incompressible)) > 20_000  # sent raw when zstd does not help


@settings(deadline=None, max_examples=300)
@given(garbage=st.binary(max_size=300), splits=st.integers(1, 5))
def test_random_garbage_raises_only_protocol_error(garbage, splits):
    decoder = FrameDecoder(max_frame=1 << 16)
    step = max(1, len(garbage) // splits)
    try:
        for i in range(0, len(garbage), step):
            decoder.feed(garbage[i : i + step])
        decoder.check_eof()
    except ProtocolError:
        pass


@settings(deadline=None, max_examples=150)
@given(kind=st.integers(0, 255), payload=st.binary(max_size=200))
def test_garbage_payloads_in_well_formed_headers_raise_only_protocol_error(kind, payload):
    decoder = FrameDecoder()
    try:
        frames = decoder.feed(HEADER.pack(len(payload), kind) + payload)
    except ProtocolError:
        return
    assert len(frames) == 1 and 0 <= frames[0].kind <= 127


def test_oversized_frame_is_refused_at_its_header():
    decoder = FrameDecoder(max_frame=1000)
    with pytest.raises(ProtocolError, match="frame length 1001 exceeds max_frame 1000"):
        decoder.feed(HEADER.pack(1001, 20))  # no payload needed to know
    with pytest.raises(ProtocolError, match="already failed"):
        decoder.feed(encode_frame(20, "fine"))


def test_encoding_an_oversized_frame_is_refused():
    with pytest.raises(ProtocolError, match="max_frame is 100"):
        encode_frame(20, os.urandom(200), max_frame=100)


def test_a_frame_is_refused_by_its_size_before_compression_as_its_receiver_counts_it():
    # 64 KiB of zeros compress to a few bytes, but the receiver checks the size they
    # decompress to: a sender that let it through would have its connection closed.
    body = b"\x00" * (64 << 10)
    with pytest.raises(ProtocolError, match="max_frame is 32768"):
        encode_frame(20, body, max_frame=32 << 10)
    fits = encode_frame(20, body, max_frame=128 << 10)
    assert len(fits) < 1024  # compressed
    assert FrameDecoder(max_frame=128 << 10).feed(fits)[0].body == body


def test_a_compressed_bomb_is_refused():
    bomb = zstandard.ZstdCompressor().compress(b"\x00" * (4 << 20))
    decoder = FrameDecoder(max_frame=1 << 20)
    with pytest.raises(ProtocolError, match="uncompressed; max_frame is 1048576"):
        decoder.feed(HEADER.pack(len(bomb), 20 | 0x80) + bomb)


def test_malformed_payloads_say_what_is_wrong():
    with pytest.raises(ProtocolError, match="undecodable msgpack"):
        FrameDecoder().feed(HEADER.pack(1, 20) + b"\xc1")
    with pytest.raises(ProtocolError, match=r"not \[request_id, body\]"):
        FrameDecoder().feed(HEADER.pack(3, 20) + b"\x92\xc0\xc0")  # [None, None]
    not_envelope = b"\xa3abc"
    with pytest.raises(ProtocolError, match=r"not \[request_id, body\]"):
        FrameDecoder().feed(HEADER.pack(len(not_envelope), 20) + not_envelope)
    with pytest.raises(ProtocolError, match="bad zstd payload"):
        FrameDecoder().feed(HEADER.pack(4, 20 | 0x80) + b"junk")


def test_a_stream_ending_inside_a_frame_is_truncated():
    wire = encode_frame(20, "hello")
    decoder = FrameDecoder()
    assert decoder.feed(wire[:-2]) == []
    assert decoder.buffered == len(wire) - 2
    with pytest.raises(
        ProtocolError, match=f"stream ended inside a frame: {len(wire) - 2} of {len(wire)}"
    ):
        decoder.check_eof()


def test_bad_kinds_and_unencodable_bodies_are_refused():
    with pytest.raises(ProtocolError):
        encode_frame(128, None)
    with pytest.raises(ProtocolError):
        encode_frame(20, object())


def test_handshake_accepts_the_same_version_only():
    (frame,) = FrameDecoder().feed(hello_frame())
    check_hello(frame)
    (newer,) = FrameDecoder().feed(hello_frame(PROTOCOL_VERSION + 1))
    with pytest.raises(ProtocolError, match="protocol version mismatch"):
        check_hello(newer)
    (no_magic,) = FrameDecoder().feed(encode_frame(HELLO, [b"HTTP", PROTOCOL_VERSION]))
    with pytest.raises(ProtocolError, match="magic"):
        check_hello(no_magic)
    with pytest.raises(ProtocolError, match="expected a HELLO"):
        check_hello(Frame(20, 0, None))


def test_handshake_says_the_cluster_and_refuses_another():
    (named,) = FrameDecoder().feed(hello_frame(cluster="c1"))
    (unnamed,) = FrameDecoder().feed(hello_frame())
    assert check_hello(named) == "c1"
    assert check_hello(named, cluster="c1") == "c1"
    assert check_hello(unnamed, cluster="c1") is None  # a client that met no node yet
    assert check_hello(named, cluster=None) == "c1"  # ... learns it here
    with pytest.raises(WrongCluster, match=r"cluster 'c1' \(the connecting side\) is not cluster 'c2' \(the accepting side\)"):
        check_hello(named, cluster="c2")
    (odd,) = FrameDecoder().feed(encode_frame(HELLO, [MAGIC, PROTOCOL_VERSION, 7]))
    with pytest.raises(ProtocolError, match="cluster id that is not a str"):
        check_hello(odd)


def test_http_request_is_not_mistaken_for_frames():
    # A common accident: an HTTP client pointed at the port. "GET " is a 1.1 GB length.
    with pytest.raises(ProtocolError, match="exceeds max_frame"):
        FrameDecoder().feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert struct.unpack(">I", b"GET ")[0] > 1 << 30


def test_frames_before_garbage_are_delivered_then_the_error():
    decoder = FrameDecoder()
    good = encode_frame(20, "first", request_id=1)
    assert decoder.feed(good + HEADER.pack(1, 20) + b"\xc1") == [Frame(20, 1, "first")]
    assert isinstance(decoder.error, ProtocolError)
    with pytest.raises(ProtocolError, match="undecodable msgpack"):
        decoder.feed(b"")
