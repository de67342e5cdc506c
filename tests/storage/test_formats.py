"""The on-disk pieces on their own: record layout, hint files, and the byte-bounded LRU."""

from __future__ import annotations

import os
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from pykv.errors import CorruptData
from pykv.storage import record
from pykv.storage.cache import ENTRY_OVERHEAD, ByteLRU
from pykv.storage.hint import read_hint, write_hint

UPDATE = st.tuples(st.binary(min_size=1, max_size=20), st.one_of(st.none(), st.binary(max_size=300)),
                   st.binary(max_size=10), st.integers(0, 2**64 - 1))


@settings(max_examples=150, deadline=None)
@given(st.lists(UPDATE, min_size=1, max_size=8))
def test_each_value_sits_at_its_computed_offset(updates) -> None:
    payload, entries = record.encode_commit(updates)
    kind, decoded = record.decode(payload)
    assert kind == record.KIND_COMMIT and decoded == entries
    for (key, value, clock, timestamp), entry in zip(updates, entries, strict=True):
        assert entry.key == key
        if value is None:
            assert entry.size == record.DELETED
        else:
            assert payload[entry.value_pos:entry.value_pos + entry.size] == value
            assert record.split_meta(entry.meta) == (timestamp, record.crc32c(value), clock)


def test_relocation_records_carry_the_original_lsn() -> None:
    meta = record.make_meta(9, b"value", b"clk")
    payload, entries = record.encode_relocation([(b"k", b"value", meta, 41)])
    kind, decoded = record.decode(payload)
    assert kind == record.KIND_RELOCATE
    assert decoded == entries and decoded[0].orig_lsn == 41 and decoded[0].meta == meta
    assert payload[decoded[0].value_pos:] == b"value"


@pytest.mark.parametrize("payload", [b"", b"\x09\x00\x00\x00\x00", b"\x01\x05\x00\x00\x00\x91"])
def test_garbage_records_raise_corrupt_data(payload: bytes) -> None:
    with pytest.raises(CorruptData):
        record.decode(payload)


def test_a_record_whose_header_disagrees_with_its_length_is_corrupt() -> None:
    payload, _ = record.encode_commit([(b"k", b"value", b"", 0)])
    with pytest.raises(CorruptData):
        record.decode(payload + b"extra")


def test_hint_round_trip_in_order(tmp_path: Path) -> None:
    path = str(tmp_path / "hint")
    entries = [(b"key%06d" % i, 1 + i // 1000, 32 + i, i % 300, b"meta%d" % i, i + 1)
               for i in range(20_000)]  # more than one 1 MiB write chunk
    assert write_hint(path, 12345, iter(entries)) == len(entries)
    lsn, got = read_hint(path)
    assert lsn == 12345 and list(got) == entries
    assert not os.path.exists(path + ".tmp")


def test_missing_hint_is_none(tmp_path: Path) -> None:
    assert read_hint(str(tmp_path / "hint")) is None


def test_a_flipped_bit_in_a_hint_is_detected(tmp_path: Path) -> None:
    path = str(tmp_path / "hint")
    write_hint(path, 7, [(b"a", 1, 40, 3, b"m", 1), (b"b", 1, 50, 3, b"m", 2)])
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0x10
    Path(path).write_bytes(bytes(data))
    with pytest.raises(CorruptData):
        list(read_hint(path)[1])


def test_a_truncated_hint_is_detected(tmp_path: Path) -> None:
    path = str(tmp_path / "hint")
    write_hint(path, 7, [(b"a", 1, 40, 3, b"m", 1)])
    os.truncate(path, os.path.getsize(path) - 1)
    with pytest.raises(CorruptData):
        result = read_hint(path)
        list(result[1])


def test_lru_evicts_least_recently_used_within_its_byte_budget() -> None:
    cache = ByteLRU(capacity_bytes=3 * (1000 + 1 + ENTRY_OVERHEAD))
    for name in (b"a", b"b", b"c"):
        cache.put(name, 1, b"x" * 1000)
    assert cache.get(b"a", 1) is not None  # a is now the most recent
    cache.put(b"d", 1, b"y" * 1000)  # evicts b, the least recently used
    assert cache.get(b"b", 1) is None and cache.get(b"a", 1) is not None
    assert cache.bytes <= cache.capacity_bytes and len(cache) == 3


def test_lru_only_returns_the_asked_version_and_skips_oversized_values() -> None:
    cache = ByteLRU(capacity_bytes=10_000)
    cache.put(b"k", 5, b"old")
    assert cache.get(b"k", 6) is None and cache.get(b"k", 5) == b"old"
    cache.put(b"k", 6, b"z" * 20_000)  # larger than the whole cache: not kept
    assert cache.get(b"k", 5) is None and cache.bytes == 0
    assert (cache.hits, cache.misses) == (1, 2)
