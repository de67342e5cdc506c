"""The commit model: wire round trips through msgpack, malformed input, MISSING."""

from __future__ import annotations

import copy
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykv.codec import check_value_fits, encode_value, pack, size_bound, unpack
from pykv.errors import InvalidValue, ProtocolError, ValueTooLarge
from pykv.txn import (
    ABSENT,
    MISSING,
    CommitRequest,
    DictState,
    Isolation,
    KeyUpdate,
    Versioned,
    WriteOp,
)
from pykv.types import INT64_MAX, INT64_MIN, MAX_VALUE_BYTES, OpKind

values = st.one_of(
    st.just(MISSING),
    st.integers(INT64_MIN, INT64_MAX),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.lists(st.one_of(st.integers(-5, 5), st.text(max_size=3), st.binary(max_size=3)), max_size=4),
)
versions = st.builds(Versioned, values, st.binary(max_size=6), st.integers(0, 1 << 62))
write_ops = st.builds(
    WriteOp,
    st.text(min_size=1, max_size=5),
    st.sampled_from(list(OpKind)),
    st.one_of(st.none(), st.integers(-9, 9), st.text(max_size=4)),
    st.one_of(st.none(), versions),
)
requests = st.builds(
    CommitRequest,
    st.integers(0, (1 << 64) - 1),
    st.integers(0, 1 << 31),
    st.dictionaries(st.text(min_size=1, max_size=5), versions, max_size=4),
    st.lists(write_ops, max_size=5).map(tuple),
    st.sampled_from(list(Isolation)),
    st.integers(0, 1 << 62),
)


@settings(deadline=None, max_examples=150)
@given(request=requests)
def test_commit_requests_survive_the_wire(request):
    assert CommitRequest.from_wire(unpack(pack(request.to_wire()))) == request


@settings(deadline=None, max_examples=150)
@given(request=requests, keys=st.sets(st.text(min_size=1, max_size=5), max_size=4))
def test_one_shards_part_encodes_like_the_restricted_request(request, keys):
    keys |= set(list(request.reads)[:1])  # a key of the request, so parts are not all empty
    assert pack(request.to_wire(keys)) == pack(request.restricted_to(keys).to_wire())


@settings(deadline=None, max_examples=100)
@given(version=versions, key=st.text(min_size=1, max_size=5))
def test_key_updates_and_versions_survive_the_wire(version, key):
    update = KeyUpdate(key, version.value, version.clock, version.timestamp)
    assert KeyUpdate.from_wire(unpack(pack(update.to_wire()))) == update
    assert update.version == version


def _wire(**changes):
    base = CommitRequest(
        1, 2, {"r": Versioned(1, b"\x01\x01", 3)}, (WriteOp("w", OpKind.PUT, "v"),)
    ).to_wire()
    base.update(changes)
    return base


@pytest.mark.parametrize(
    "data",
    [
        [],
        {"txid": 1},
        _wire(iso="snapshot"),
        _wire(txid="1"),
        _wire(ts=True),
        _wire(reads={"r": [b"", 0]}),
        _wire(reads=[["r", [b"", 0, 1, 2]]]),
        _wire(reads=[["r", ["not bytes", 0]]]),
        _wire(reads=[[1, [b"", 0]]]),
        _wire(writes=[["w", 99, "v", None]]),
        _wire(writes=[["w", [1], "v", None]]),  # an unhashable kind
        _wire(iso="snapshot"),
        _wire(iso=["serializable"]),
        _wire(writes=[["w", 1, "v"]]),
        _wire(writes=[[b"w", 1, "v", None]]),
    ],
)
def test_malformed_requests_are_protocol_errors(data):
    with pytest.raises(ProtocolError):
        CommitRequest.from_wire(data)


def test_missing_is_one_falsy_singleton_that_survives_copies():
    assert not MISSING and repr(MISSING) == "MISSING"
    assert copy.deepcopy(MISSING) is MISSING
    assert pickle.loads(pickle.dumps(MISSING)) is MISSING
    assert type(MISSING)() is MISSING
    assert not ABSENT.exists and Versioned(0, b"").exists


def test_restricted_request_keeps_only_the_given_keys_in_order():
    request = CommitRequest(
        1,
        2,
        {"a": ABSENT, "b": ABSENT},
        (WriteOp("b", OpKind.PUT, 1), WriteOp("c", OpKind.INCR, 1), WriteOp("b", OpKind.INCR, 1)),
        Isolation.MERGE,
        5,
    )
    part = request.restricted_to({"b"})
    assert list(part.reads) == ["b"]
    assert [op.kind for op in part.writes] == [OpKind.PUT, OpKind.INCR]
    assert (part.txid, part.coordinator, part.isolation, part.timestamp) == (
        1,
        2,
        Isolation.MERGE,
        5,
    )
    assert request.written_keys() == ["b", "c"]


def test_dict_state_returns_absent_for_unknown_keys_and_keeps_tombstones():
    state = DictState()
    assert state.get("x") is ABSENT
    state.apply([KeyUpdate("x", MISSING, b"\x01\x01", 4)])
    assert state.get("x") == Versioned(MISSING, b"\x01\x01", 4)


_scalars = st.text() | st.binary() | st.integers(min_value=-(2**63), max_value=2**63 - 1)


@given(value=_scalars | st.lists(_scalars))
def test_size_bound_is_never_below_the_encoded_size(value):
    """Puts (check_value_fits) and scan budgets trust it as an upper bound."""
    assert size_bound(value) >= len(pack(value))


def test_check_value_fits_agrees_with_encoding_at_the_limit():
    """A put checks its value without encoding it; the verdict must be encode_value()'s."""
    limit = MAX_VALUE_BYTES
    cases = [
        b"x" * (limit - 5), b"x" * (limit - 4),  # bin32 header: 5 bytes
        "a" * (limit - 5), "a" * (limit - 4),
        "é" * ((limit - 5) // 2), "é" * ((limit - 5) // 2 + 1),  # 2 bytes a char
        ["y" * 1000] * 1000, ["y" * 1000] * 1100,
        [1] * 200_000, 2**63 - 1,
    ]
    for value in cases:
        try:
            encode_value(value)
            expected = None
        except ValueTooLarge:
            expected = ValueTooLarge
        if expected is None:
            check_value_fits(value)
        else:
            with pytest.raises(ValueTooLarge):
                check_value_fits(value)
    for bad in (True, 1.5, None, [[1]], 2**63, {"a": 1}):
        with pytest.raises(InvalidValue):
            check_value_fits(bad)
