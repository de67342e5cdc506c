"""The rules of DESIGN §3 against hand-built states: interleaved transactions on a DictState."""

from __future__ import annotations

import copy

import pytest

from pykv._engine.vclock import AFTER, CONCURRENT, VClock
from pykv.errors import (
    InvalidOperation,
    InvalidValue,
    KeyTooLarge,
    NonResolvableConflict,
    TransactionConflict,
    TransactionTooLarge,
    ValueTooLarge,
)
from pykv.txn import (
    ABSENT,
    MAX_CLOCK_ENTRIES,
    MISSING,
    CommitRequest,
    DictState,
    Isolation,
    ResolverRegistry,
    Versioned,
    WriteOp,
    validate,
)
from pykv.types import INT64_MAX, MAX_VALUE_BYTES, OpKind

SER = Isolation.SERIALIZABLE
MERGE = Isolation.MERGE


def clock(**entries: int) -> bytes:
    """clock(n1=3, n2=1) -> the encoded clock {1: 3, 2: 1}."""
    return VClock({int(name[1:]): count for name, count in entries.items()}).encode()


class Txn:
    """A client-side transaction as the stores build it: reads record versions, writes buffer."""

    def __init__(self, state: DictState, txid: int, node: int = 1) -> None:
        self.state, self.txid, self.node = state, txid, node
        self.reads: dict[str, Versioned] = {}
        self.writes: list[WriteOp] = []

    def read(self, key: str):
        version = self.state.get(key)
        self.reads[key] = version
        return version.value

    def _op(self, key: str, kind: OpKind, arg=None, context: Versioned | None = None) -> None:
        self.writes.append(WriteOp(key, kind, arg, context or self.reads.get(key)))

    def put(self, key, value, context=None):
        self._op(key, OpKind.PUT, value, context)

    def delete(self, key):
        self._op(key, OpKind.DELETE)

    def incr(self, key, amount=1):
        self._op(key, OpKind.INCR, amount)

    def append(self, key, item):
        self._op(key, OpKind.APPEND, item)

    def request(self, isolation=SER, timestamp=0) -> CommitRequest:
        return CommitRequest(
            self.txid, self.node, dict(self.reads), tuple(self.writes), isolation, timestamp
        )

    def commit(self, resolvers=None, isolation=SER, timestamp=0):
        updates = validate(
            self.request(isolation, timestamp), self.state, resolvers or ResolverRegistry()
        )
        self.state.apply(updates)
        return updates


def seeded(**values) -> DictState:
    state = DictState()
    boot = Txn(state, 0, node=9)
    for key, value in values.items():
        boot.put(key, value)
    boot.commit()
    return state


# --- rule 1: keys only read ---------------------------------------------------------------


@pytest.mark.parametrize("isolation", [SER, MERGE])
def test_read_key_changed_by_a_concurrent_commit_aborts(isolation):
    state = seeded(x=1, y=1)
    t1, t2 = Txn(state, 1), Txn(state, 2)
    t1.read("x")
    t2.read("x")
    t2.put("x", 2)
    t2.commit()
    t1.put("y", 5)
    before = copy.deepcopy(state.versions)
    with pytest.raises(TransactionConflict, match="'x'"):
        t1.commit(isolation=isolation)
    assert state.versions == before


def test_read_of_an_absent_key_conflicts_with_its_creation():
    state = DictState()
    t1, t2 = Txn(state, 1), Txn(state, 2)
    assert t1.read("x") is MISSING
    t2.put("x", "now here")
    t2.commit()
    t1.put("y", 1)
    with pytest.raises(TransactionConflict):
        t1.commit()


def test_a_delete_keeps_a_tombstone_clock_so_readers_still_conflict():
    state = seeded(x=1)
    t1, t2 = Txn(state, 1), Txn(state, 2)
    t1.read("x")
    t2.delete("x")
    t2.commit()
    assert state.get("x").value is MISSING and state.get("x").clock
    t1.put("y", 1)
    with pytest.raises(TransactionConflict):
        t1.commit()


def test_unchanged_reads_commit_and_later_readers_see_the_write():
    state = seeded(x=1)
    t1 = Txn(state, 1)
    t1.put("y", t1.read("x") + 1)
    t1.commit()
    assert state.value("y") == 2


# --- rule 2: written keys observed --------------------------------------------------------


def test_write_write_conflict_aborts_under_serializable_even_with_a_resolver():
    state = seeded(n=10)
    resolvers = ResolverRegistry()
    resolvers.register("", "counter")
    t1, t2 = Txn(state, 1), Txn(state, 2)
    t1.put("n", t1.read("n") + 1)
    t2.put("n", t2.read("n") + 5)
    t1.commit(resolvers)
    with pytest.raises(TransactionConflict) as info:
        t2.commit(resolvers)
    assert not isinstance(info.value, NonResolvableConflict)
    assert state.value("n") == 11


def test_merge_isolation_with_the_default_resolver_still_aborts():
    state = seeded(n=10)
    t1, t2 = Txn(state, 1), Txn(state, 2)
    t1.put("n", t1.read("n") + 1)
    t2.put("n", t2.read("n") + 5)
    t1.commit()
    with pytest.raises(TransactionConflict):
        t2.commit(isolation=MERGE)
    assert state.value("n") == 11


def test_merge_isolation_counter_adds_both_deltas():
    state = seeded(**{"hits/a": 10})
    resolvers = ResolverRegistry()
    resolvers.register("hits/", "counter")
    t1, t2, t3 = Txn(state, 1, node=1), Txn(state, 2, node=2), Txn(state, 3, node=3)
    for txn, delta in ((t1, 1), (t2, 5), (t3, -2)):
        txn.put("hits/a", txn.read("hits/a") + delta)
    t1.commit(resolvers, MERGE)
    t2.commit(resolvers, MERGE)
    t3.commit(resolvers, MERGE)
    assert state.value("hits/a") == 14


def test_merge_isolation_union_keeps_both_additions():
    state = seeded(tags=["a"])
    resolvers = ResolverRegistry()
    resolvers.register("tags", "union")
    t1, t2 = Txn(state, 1, node=1), Txn(state, 2, node=2)
    t1.put("tags", t1.read("tags") + ["b"])
    t2.put("tags", t2.read("tags") + ["c"])
    t1.commit(resolvers, MERGE, timestamp=10)
    t2.commit(resolvers, MERGE, timestamp=20)
    assert state.value("tags") == ["a", "b", "c"]


def test_merge_isolation_lww_keeps_the_later_timestamp_whatever_the_commit_order():
    state = seeded(k="base")
    resolvers = ResolverRegistry()
    resolvers.register("k", "lww")
    t_late, t_early = Txn(state, 1, node=1), Txn(state, 2, node=2)
    t_late.read("k")
    t_late.put("k", "late")
    t_early.read("k")
    t_early.put("k", "early")
    t_late.commit(resolvers, MERGE, timestamp=200)
    updates = t_early.commit(resolvers, MERGE, timestamp=100)
    assert state.value("k") == "late"
    assert updates[0].timestamp == 200  # the stored timestamp is the winner's


def test_merge_isolation_lww_lets_a_later_delete_win():
    state = seeded(k="v")
    resolvers = ResolverRegistry()
    resolvers.register("k", "lww")
    t1, t2 = Txn(state, 1, node=1), Txn(state, 2, node=2)
    t1.read("k")
    t1.put("k", "w")
    t2.read("k")
    t2.delete("k")
    t1.commit(resolvers, MERGE, timestamp=5)
    t2.commit(resolvers, MERGE, timestamp=6)
    assert state.value("k") is MISSING


def test_a_non_resolvable_key_aborts_the_whole_transaction_with_nothing_returned():
    state = seeded(**{"c/ok": 1, "c/typed": 1})
    resolvers = ResolverRegistry()
    resolvers.register("c/", "counter")
    t1, t2 = Txn(state, 1, node=1), Txn(state, 2, node=2)
    for key in ("c/ok", "c/typed"):
        t1.put(key, t1.read(key) + 1)
        t2.read(key)
    t2.put("c/ok", 7)  # resolvable on its own
    t2.put("c/typed", "not an int")  # different types: non-resolvable
    t2.put("other", "x")
    t1.commit(resolvers, MERGE)
    before = copy.deepcopy(state.versions)
    with pytest.raises(NonResolvableConflict, match="c/typed"):
        t2.commit(resolvers, MERGE)
    assert state.versions == before
    assert state.get("other") is ABSENT


def test_a_failing_user_resolver_is_a_non_resolvable_conflict():
    state = seeded(k=1)
    resolvers = ResolverRegistry()

    def broken(base, current, mine):
        raise ZeroDivisionError("oops")

    resolvers.register("k", broken)
    t1, t2 = Txn(state, 1), Txn(state, 2, node=2)
    t1.put("k", t1.read("k") + 1)
    t2.put("k", t2.read("k") + 1)
    t1.commit()
    with pytest.raises(NonResolvableConflict, match="broken"):
        t2.commit(resolvers, MERGE)


def test_a_user_resolver_result_is_checked_like_any_value():
    state = seeded(k=1)
    resolvers = ResolverRegistry()
    resolvers.register("k", lambda base, current, mine: 1.5)
    t1, t2 = Txn(state, 1), Txn(state, 2, node=2)
    t1.put("k", t1.read("k") + 1)
    t2.put("k", t2.read("k") + 1)
    t1.commit()
    with pytest.raises(InvalidValue):
        t2.commit(resolvers, MERGE)


def test_resolver_sees_base_current_and_mine():
    state = seeded(k=1)
    seen = []
    resolvers = ResolverRegistry()
    resolvers.register("k", lambda base, current, mine: seen.append((base, current, mine)) or 42)
    t1, t2 = Txn(state, 1, node=1), Txn(state, 2, node=2)
    base = state.get("k")
    t1.put("k", t1.read("k") + 1)
    t2.put("k", t2.read("k") + 10)
    t1.commit()
    current = state.get("k")
    t2.commit(resolvers, MERGE, timestamp=77)
    ((got_base, got_current, got_mine),) = seen
    assert got_base == base and got_current == current
    assert got_mine.value == 11 and got_mine.timestamp == 77
    assert VClock.decode(got_mine.clock).to_dict() == {**VClock.decode(base.clock).to_dict(), 2: 1}
    assert state.value("k") == 42


def test_context_write_without_a_read_is_checked_like_a_read():
    state = seeded(k="v1")
    context = state.get("k")  # get_versioned(), minutes earlier
    other = Txn(state, 1)
    other.put("k", "v2")
    other.commit()
    offline = Txn(state, 2)
    offline.put("k", "v3", context=context)
    with pytest.raises(TransactionConflict):
        offline.commit()
    fresh = Txn(state, 3)
    fresh.put("k", "v3", context=state.get("k"))
    fresh.commit()
    assert state.value("k") == "v3"


def test_two_observations_that_disagree_are_a_conflict():
    state = seeded(k=1)
    stale = state.get("k")
    bump = Txn(state, 1)
    bump.put("k", 2)
    bump.commit()
    t = Txn(state, 2)
    t.read("k")
    t.put("k", 3, context=stale)
    t.writes.insert(0, WriteOp("k", OpKind.PUT, 0, stale))
    with pytest.raises(TransactionConflict, match="two different versions"):
        t.commit(isolation=MERGE)


def test_an_observed_clock_newer_than_the_stored_one_passes():
    # e.g. a tombstone compacted away after the transaction observed it
    state = DictState({"k": Versioned(MISSING, b"", 0)})
    t = Txn(state, 1)
    t.put("k", "v", context=Versioned(MISSING, clock(n1=3)))
    updates = t.commit()
    assert VClock.decode(updates[0].clock).to_dict() == {1: 4}


# --- rule 3: blind writes and commutative ops ---------------------------------------------


def test_blind_writes_replace_in_commit_order_without_a_check():
    state = seeded(x="old")
    t1, t2 = Txn(state, 1, node=1), Txn(state, 2, node=2)
    t1.put("x", "first")
    t2.put("x", "second")
    t2.commit()
    t1.commit()
    assert state.value("x") == "first"


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 2, 0)])
def test_incr_on_unread_keys_never_conflicts_and_commutes(order):
    state = seeded(n=100)
    txns = [Txn(state, i, node=i + 1) for i in range(3)]
    for txn, delta in zip(txns, (1, 20, -300), strict=True):
        txn.incr("n", delta)
        txn.incr("created", delta)
    for i in order:
        txns[i].commit()
    assert state.value("n") == 100 + 1 + 20 - 300
    assert state.value("created") == 1 + 20 - 300


def test_appends_on_unread_keys_never_conflict():
    state = DictState()
    t1, t2 = Txn(state, 1), Txn(state, 2)
    t1.append("log", "a")
    t2.append("log", "b")
    t2.commit()
    t1.commit()
    assert state.value("log") == ["b", "a"]


def test_incr_after_a_read_is_a_read_modify_write_and_conflicts():
    state = seeded(n=1)
    t1, t2 = Txn(state, 1), Txn(state, 2)
    t1.read("n")
    t1.incr("n")
    t2.incr("n")
    t2.commit()
    with pytest.raises(TransactionConflict):
        t1.commit()


# --- rule 4: clocks -------------------------------------------------------------------------


def test_new_clock_is_the_pointwise_max_with_the_coordinator_incremented():
    current = Versioned(10, clock(n1=3, n2=1), 5)
    observed = Versioned(7, clock(n1=2, n3=4), 4)
    state = DictState({"k": current})
    resolvers = ResolverRegistry()
    resolvers.register("k", "max")
    t = Txn(state, 1, node=2)
    t.put("k", 12, context=observed)
    (update,) = t.commit(resolvers, MERGE, timestamp=3)
    assert VClock.decode(update.clock).to_dict() == {1: 3, 2: 2, 3: 4}
    assert update.value == 12 and update.timestamp == 5


def test_blind_write_clock_increments_the_current_clock():
    state = DictState({"k": Versioned("v", clock(n1=3, n2=1), 0)})
    t = Txn(state, 1, node=1)
    t.put("k", "w")
    (update,) = t.commit(timestamp=9)
    assert VClock.decode(update.clock).to_dict() == {1: 4, 2: 1}
    assert update.timestamp == 9


def test_clocks_are_pruned_but_keep_the_coordinator_entry():
    full = {node: 100 + node for node in range(1, MAX_CLOCK_ENTRIES + 1)}
    old = VClock(full).encode()
    state = DictState({"k": Versioned("v", old, 0)})
    t = Txn(state, 1, node=999)
    t.put("k", "w")
    (update,) = t.commit()
    new = VClock.decode(update.clock)
    assert len(new) == MAX_CLOCK_ENTRIES
    assert new.get(999) == 1
    assert new.compare(VClock.decode(old)) in (AFTER, CONCURRENT)  # the write stays visible
    assert 1 not in new.to_dict()  # the lowest counter went


# --- folding operations ---------------------------------------------------------------------


def _fold(initial, *ops):
    state = DictState() if initial is MISSING else seeded(k=initial)
    t = Txn(state, 1)
    for kind, arg in ops:
        t._op("k", kind, arg)
    return t.commit()[0].value


@pytest.mark.parametrize(
    ("initial", "ops", "expected"),
    [
        (MISSING, [(OpKind.INCR, 5)], 5),
        (2, [(OpKind.INCR, 5), (OpKind.INCR, -1)], 6),
        (MISSING, [(OpKind.APPEND, "x")], ["x"]),
        ([1], [(OpKind.APPEND, b"y"), (OpKind.APPEND, "z")], [1, b"y", "z"]),
        ("ab", [(OpKind.APPEND, "c")], "abc"),
        (b"ab", [(OpKind.APPEND, b"c")], b"abc"),
        ("s", [(OpKind.PUT, 1), (OpKind.INCR, 1)], 2),
        (5, [(OpKind.DELETE, None), (OpKind.APPEND, 1)], [1]),
        (5, [(OpKind.INCR, 1), (OpKind.DELETE, None)], MISSING),
    ],
)
def test_ops_fold_in_program_order(initial, ops, expected):
    assert _fold(initial, *ops) == expected


def test_append_does_not_mutate_the_stored_list():
    state = seeded(k=[1])
    stored = state.get("k").value
    t = Txn(state, 1)
    t.append("k", 2)
    t.commit()
    assert stored == [1] and state.value("k") == [1, 2]


@pytest.mark.parametrize(
    ("initial", "op", "error"),
    [
        ("s", (OpKind.INCR, 1), InvalidOperation),
        ([1], (OpKind.INCR, 1), InvalidOperation),
        (INT64_MAX, (OpKind.INCR, 1), InvalidValue),
        (1, (OpKind.INCR, "1"), InvalidValue),
        (1, (OpKind.INCR, True), InvalidValue),
        (1, (OpKind.APPEND, "x"), InvalidOperation),
        ("s", (OpKind.APPEND, b"x"), InvalidOperation),
        (b"s", (OpKind.APPEND, 1), InvalidOperation),
        (MISSING, (OpKind.APPEND, [1]), InvalidValue),
        (MISSING, (OpKind.PUT, 1.5), InvalidValue),
        (MISSING, (OpKind.PUT, [[1]]), InvalidValue),
    ],
)
def test_invalid_ops_raise_specific_errors(initial, op, error):
    with pytest.raises(error):
        _fold(initial, op)


def test_results_obey_the_value_size_limit():
    big = "x" * (MAX_VALUE_BYTES - 100)
    state = seeded(k=big)
    t = Txn(state, 1)
    t.append("k", "y" * 200)
    before = copy.deepcopy(state.versions)
    with pytest.raises(ValueTooLarge):
        t.commit()
    assert state.versions == before
    t2 = Txn(state, 2)
    t2.append("k", "y" * 50)
    t2.commit()
    assert len(state.value("k")) == MAX_VALUE_BYTES - 50


def test_limits_on_keys_and_operation_counts():
    state = DictState()
    t = Txn(state, 1)
    t.put("k" * 257, 1)
    with pytest.raises(KeyTooLarge):
        t.commit()
    many = Txn(state, 2)
    for i in range(11):
        many.put(f"k{i}", i)
    with pytest.raises(TransactionTooLarge):
        validate(many.request(), state, ResolverRegistry(), max_ops=10)
    assert state.versions == {}


def test_updates_come_one_per_key_in_first_write_order():
    state = DictState()
    t = Txn(state, 1)
    t.put("b", 1)
    t.put("a", 1)
    t.incr("b", 1)
    assert [(u.key, u.value) for u in t.commit()] == [("b", 2), ("a", 1)]
