"""Built-in resolvers and the registry: determinism under shuffles, merge laws, prefixes."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykv._engine.vclock import VClock
from pykv.errors import InvalidOperation, InvalidValue, NonResolvableConflict, TransactionConflict
from pykv.txn import (
    BUILTIN,
    MISSING,
    CommitRequest,
    DictState,
    Isolation,
    ResolverRegistry,
    Versioned,
    WriteOp,
    canonical_order,
    validate,
)
from pykv.txn.resolvers import resolve_counter, resolve_lww, resolve_merge3, resolve_union
from pykv.types import INT64_MAX, INT64_MIN, OpKind

SETTINGS = settings(deadline=None, max_examples=150)

scalars = st.one_of(st.integers(INT64_MIN, INT64_MAX), st.text(max_size=4), st.binary(max_size=4))
small_items = st.sampled_from(["a", "b", "c", 1, 2, b"a"])
values = st.one_of(st.just(MISSING), scalars, st.lists(small_items, max_size=8))
clocks = st.dictionaries(st.integers(1, 5), st.integers(1, 9), max_size=4).map(
    lambda d: VClock(d).encode()
)
timestamps = st.integers(0, 5)


def versions_of(value_strategy):
    return st.builds(Versioned, value_strategy, clocks, timestamps)


any_version = versions_of(values)
int_version = versions_of(st.integers(-(1 << 40), 1 << 40))
list_version = versions_of(st.lists(small_items, max_size=8))


def outcome(resolver, base, current, mine):
    """The resolver's value, or the type of error it raised (errors must be deterministic too)."""
    try:
        return ("value", resolver(base, current, mine))
    except (NonResolvableConflict, InvalidValue, TransactionConflict) as exc:
        return ("error", type(exc))


@SETTINGS
@given(
    name=st.sampled_from(sorted(BUILTIN)),
    base=any_version,
    current=any_version,
    mine=any_version,
)
def test_every_builtin_ignores_which_concurrent_version_arrived_first(name, base, current, mine):
    resolver = BUILTIN[name]
    assert outcome(resolver, base, current, mine) == outcome(resolver, base, mine, current)


@SETTINGS
@given(
    name=st.sampled_from(["counter", "max", "min"]),
    base=int_version,
    pair=st.lists(int_version, min_size=2, max_size=2),
    rng=st.randoms(use_true_random=False),
)
def test_int_resolvers_give_one_result_for_any_shuffle(name, base, pair, rng):
    shuffled = list(pair)
    rng.shuffle(shuffled)
    assert BUILTIN[name](base, *pair) == BUILTIN[name](base, *shuffled)


@SETTINGS
@given(base=list_version, versions=st.permutations([0, 1]), current=list_version, mine=list_version)
def test_list_resolvers_order_by_canonical_order_not_arrival(base, versions, current, mine):
    pair = [current, mine]
    ordered = [pair[i] for i in versions]
    for resolver in (resolve_union, resolve_merge3):
        assert resolver(base, *ordered) == resolver(base, *canonical_order(current, mine))


@SETTINGS
@given(
    start=st.integers(-1000, 1000),
    deltas=st.lists(st.integers(-1000, 1000), min_size=1, max_size=6),
    seed=st.integers(0, 1 << 30),
)
def test_counter_merges_equal_the_sum_of_the_increments(start, deltas, seed):
    """Concurrent read-modify-write txns on one counter, committed in any order, all count."""
    state = DictState()
    state.apply(validate(_put("n", start, txid=0, node=50), state, ResolverRegistry()))
    base = state.get("n")
    resolvers = ResolverRegistry()
    resolvers.register("n", "counter")
    requests = [
        CommitRequest(
            i + 1,
            i + 1,
            {"n": base},
            (WriteOp("n", OpKind.PUT, start + d, base),),
            Isolation.MERGE,
            i,
        )
        for i, d in enumerate(deltas)
    ]
    random.Random(seed).shuffle(requests)
    for request in requests:
        state.apply(validate(request, state, resolvers))
    assert state.value("n") == start + sum(deltas)


def _put(key, value, txid, node):
    return CommitRequest(txid, node, {}, (WriteOp(key, OpKind.PUT, value),))


@SETTINGS
@given(base=list_version, a=list_version)
def test_union_is_idempotent(base, a):
    assert resolve_union(base, a, a) == a.value


@SETTINGS
@given(base=list_version, a=list_version, b=list_version, c=list_version)
def test_union_keeps_each_item_as_often_as_the_richest_side(base, a, b, c):
    merged = resolve_union(base, a, b)
    assert Counter(merged) == Counter(a.value) | Counter(b.value)
    again = Versioned(merged, a.clock, a.timestamp)
    assert Counter(resolve_union(base, again, b)) == Counter(merged)  # b a second time adds nothing
    # the merged content does not depend on the order three versions are folded in
    left = resolve_union(base, Versioned(resolve_union(base, a, b), b"", 0), c)
    right = resolve_union(base, Versioned(resolve_union(base, c, b), b"", 0), a)
    assert Counter(left) == Counter(right)


@SETTINGS
@given(base=list_version, current=list_version, mine=list_version)
def test_merge3_applies_both_sides_changes_relative_to_base(base, current, mine):
    merged = resolve_merge3(base, current, mine)
    expected = Counter(current.value) + Counter(mine.value)
    expected.subtract(Counter(base.value))
    assert Counter(merged) == +expected
    # a side that did not change leaves the other side's content as it is
    unchanged = Versioned(base.value, base.clock, base.timestamp)
    assert Counter(resolve_merge3(base, unchanged, mine)) == Counter(mine.value)


def test_merge3_keeps_the_earlier_versions_order_and_adds_the_later_ones_items():
    base = Versioned(["a", "b", "c"], b"", 1)
    current = Versioned(["a", "c", "d"], b"\x01\x01", 2)  # removed b, added d
    mine = Versioned(["x", "a", "b"], b"\x02\x01", 3)  # removed c, added x
    assert resolve_merge3(base, current, mine) == ["a", "d", "x"]
    assert resolve_merge3(base, mine, current) == ["a", "d", "x"]


def test_lww_orders_by_timestamp_then_clock():
    older = Versioned("old", b"\x05\x01", 10)
    newer = Versioned("new", b"\x01\x01", 11)
    assert resolve_lww(older, older, newer) == "new"
    tie_a = Versioned("a", b"\x01\x01", 10)
    tie_b = Versioned("b", b"\x02\x01", 10)
    assert resolve_lww(older, tie_a, tie_b) == resolve_lww(older, tie_b, tie_a) == "b"


@pytest.mark.parametrize("name", ["max", "min", "counter", "union", "merge3"])
def test_values_of_different_types_are_non_resolvable(name):
    base = Versioned(1, b"", 0)
    for current, mine in ((1, "1"), ([1], 1), (b"x", "x"), (MISSING, 5), ([1], MISSING)):
        with pytest.raises(NonResolvableConflict):
            BUILTIN[name](base, Versioned(current, b"", 1), Versioned(mine, b"", 2))


@pytest.mark.parametrize("name", ["lww", "max", "min", "counter", "union", "merge3"])
def test_both_sides_deleting_keeps_the_key_deleted(name):
    base = Versioned([1], b"", 0)
    assert (
        BUILTIN[name](base, Versioned(MISSING, b"\x01\x01", 1), Versioned(MISSING, b"", 2))
        is MISSING
    )


def test_abort_raises_a_retryable_conflict():
    v = Versioned(1, b"", 0)
    with pytest.raises(TransactionConflict) as info:
        BUILTIN["abort"](v, v, v)
    assert not isinstance(info.value, NonResolvableConflict)


def test_counter_overflow_is_an_invalid_value():
    with pytest.raises(InvalidValue):
        resolve_counter(Versioned(0, b""), Versioned(INT64_MAX, b""), Versioned(1, b""))


def test_registry_longest_prefix_wins_and_the_default_is_abort():
    registry = ResolverRegistry()
    registry.register("user/", "lww")
    registry.register("user/counters/", "counter")
    registry.register("", "union")
    assert registry.resolver_for("user/counters/x") is BUILTIN["counter"]
    assert registry.resolver_for("user/name") is BUILTIN["lww"]
    assert registry.resolver_for("other") is BUILTIN["union"]
    registry.unregister("")
    assert registry.resolver_for("other") is BUILTIN["abort"]
    assert registry.name_for("user/counters/") == "counter"
    assert registry.name_for("use") == "abort"


def test_registry_accepts_functions_and_rejects_unknown_names():
    def mine_wins(base, current, mine):
        return mine.value

    registry = ResolverRegistry(default="lww")
    registry.register("k", mine_wins)
    assert registry.resolver_for("key") is mine_wins
    assert registry.name_for("key").endswith("mine_wins")
    assert registry.resolver_for("x") is BUILTIN["lww"]
    with pytest.raises(InvalidOperation):
        registry.register("k", "no-such-resolver")
    with pytest.raises(InvalidOperation):
        registry.register("k", 42)  # type: ignore[arg-type]
