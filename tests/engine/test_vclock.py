"""Vector clocks: the lattice laws, the canonical encoding, and agreement with a dict model."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykv._engine.vclock import (
    AFTER,
    BEFORE,
    CONCURRENT,
    EQUAL,
    VClock,
    compare_encoded,
    merge_encoded,
)
from pykv.errors import CorruptData

U32 = 2**32 - 1
U64 = 2**64 - 1

# Small node and counter ranges make overlaps (and so every relation) common.
small_dicts = st.dictionaries(st.integers(0, 6), st.integers(1, 4), max_size=6)
wide_dicts = st.dictionaries(st.integers(0, U32), st.integers(1, U64), max_size=8)
clock_dicts = st.one_of(small_dicts, wide_dicts)
clocks = clock_dicts.map(VClock)


def model_compare(a: dict[int, int], b: dict[int, int]) -> int:
    nodes = set(a) | set(b)
    a_bigger = any(a.get(n, 0) > b.get(n, 0) for n in nodes)
    b_bigger = any(b.get(n, 0) > a.get(n, 0) for n in nodes)
    if a_bigger and b_bigger:
        return CONCURRENT
    return AFTER if a_bigger else BEFORE if b_bigger else EQUAL


# --- behaviour against a dict model ------------------------------------------------------


@settings(deadline=None, max_examples=200)
@given(clock_dicts, clock_dicts)
def test_compare_and_merge_match_the_dict_model(a: dict, b: dict) -> None:
    ca, cb = VClock(a), VClock(b)
    assert ca.compare(cb) == model_compare(a, b)
    assert compare_encoded(ca.encode(), cb.encode()) == model_compare(a, b)
    merged = {n: max(a.get(n, 0), b.get(n, 0)) for n in set(a) | set(b)}
    assert ca.merge(cb).to_dict() == merged
    assert merge_encoded(ca.encode(), cb.encode()) == VClock(merged).encode()
    assert ca.descends(cb) == (model_compare(a, b) in (EQUAL, AFTER))


@settings(deadline=None, max_examples=100)
@given(clock_dicts.filter(lambda d: U64 not in d.values()), st.integers(0, U32))
def test_increment_adds_one_to_that_node_only(a: dict, node: int) -> None:
    bumped = VClock(a).increment(node)
    assert bumped.to_dict() == {**a, node: a.get(node, 0) + 1}
    assert bumped.compare(VClock(a)) == AFTER


def test_get_is_zero_for_absent_nodes() -> None:
    clock = VClock({3: 7})
    assert clock.get(3) == 7
    assert clock.get(4) == 0
    assert clock.get(-1) == 0


def test_zero_counters_mean_absent() -> None:
    assert VClock({1: 0, 2: 5}) == VClock({2: 5})
    assert VClock({1: 0}).encode() == b""


# --- lattice laws --------------------------------------------------------------------------


@settings(deadline=None, max_examples=150)
@given(clocks, clocks, clocks)
def test_merge_is_commutative_associative_idempotent(a: VClock, b: VClock, c: VClock) -> None:
    assert a.merge(b) == b.merge(a)
    assert a.merge(b).merge(c) == a.merge(b.merge(c))
    assert a.merge(a) == a


@settings(deadline=None, max_examples=150)
@given(clocks, clocks)
def test_compare_is_consistent_with_merge(a: VClock, b: VClock) -> None:
    merged = a.merge(b)
    assert merged.descends(a) and merged.descends(b)
    rel = a.compare(b)
    # a <= b exactly when merging a into b changes nothing.
    assert (rel in (EQUAL, BEFORE)) == (merged == b)
    assert (rel in (EQUAL, AFTER)) == (merged == a)
    assert b.compare(a) == {EQUAL: EQUAL, BEFORE: AFTER, AFTER: BEFORE, CONCURRENT: CONCURRENT}[rel]


# --- encoding ------------------------------------------------------------------------------


@settings(deadline=None, max_examples=200)
@given(clocks)
def test_encoding_round_trips(a: VClock) -> None:
    assert VClock.decode(a.encode()) == a
    assert pickle.loads(pickle.dumps(a)) == a


@settings(deadline=None, max_examples=200)
@given(clock_dicts)
def test_equal_clocks_encode_to_equal_bytes(a: dict) -> None:
    reordered = dict(sorted(a.items(), reverse=True))
    assert VClock(a).encode() == VClock(reordered).encode()
    assert hash(VClock(a)) == hash(VClock(reordered))


def test_empty_clock() -> None:
    empty = VClock()
    assert empty.encode() == b""
    assert VClock.decode(b"") == empty == VClock({})
    assert not empty and len(empty) == 0
    assert compare_encoded(b"", b"") == EQUAL
    assert merge_encoded(b"", VClock({1: 1}).encode()) == VClock({1: 1}).encode()


def test_encoding_is_compact() -> None:
    # Small nodes and counters cost two bytes per entry.
    assert len(VClock({1: 3, 2: 9, 4: 100}).encode()) == 6


@pytest.mark.parametrize(
    "data",
    [
        b"\x80",  # truncated varint
        b"\x01",  # node without counter
        b"\x01\x00",  # zero counter
        b"\x01\x01\x00\x01",  # zero node delta (duplicate node)
        b"\x81\x00\x01",  # overlong node varint
        b"\x01\x81\x00",  # overlong counter varint
        b"\x80\x80\x80\x80\x10\x01",  # node 2**32: too big
        b"\x01" + b"\xff" * 9 + b"\x02",  # counter >= 2**64
    ],
)
def test_malformed_bytes_raise_corrupt_data(data: bytes) -> None:
    with pytest.raises(CorruptData):
        VClock.decode(data)
    with pytest.raises(CorruptData):
        compare_encoded(data, b"")
    with pytest.raises(CorruptData):
        merge_encoded(b"", data)
    with pytest.raises(CorruptData):
        merge_encoded(VClock({9: 9}).encode(), data)


@settings(deadline=None, max_examples=300)
@given(st.binary(max_size=24))
def test_random_bytes_decode_canonically_or_raise(data: bytes) -> None:
    try:
        clock = VClock.decode(data)
    except CorruptData:
        return
    assert clock.encode() == data


def test_out_of_range_input_is_rejected() -> None:
    with pytest.raises(ValueError):
        VClock({U32 + 1: 1})
    with pytest.raises(ValueError):
        VClock({1: -1})
    with pytest.raises(ValueError):
        VClock({1: U64 + 1})
    with pytest.raises(OverflowError):
        VClock({1: U64}).increment(1)
    with pytest.raises(TypeError):
        VClock.decode("not bytes")


# --- pruning -------------------------------------------------------------------------------


@settings(deadline=None, max_examples=150)
@given(clock_dicts, st.integers(0, 10))
def test_prune_keeps_the_highest_counters_deterministically(a: dict, limit: int) -> None:
    pruned = VClock(a).prune(limit)
    ranked = sorted(a.items(), key=lambda item: (-item[1], item[0]))
    assert pruned.to_dict() == dict(ranked[:limit])
    assert VClock(a).descends(pruned)


def test_prune_breaks_ties_by_lower_node_id() -> None:
    assert VClock({5: 2, 1: 2, 3: 2, 9: 7}).prune(2).to_dict() == {1: 2, 9: 7}


def test_repr_and_eq_with_other_types() -> None:
    assert repr(VClock({2: 1})) == "VClock({2: 1})"
    assert VClock() != b""
