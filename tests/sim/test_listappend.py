"""The list-append checker finds dependency cycles and read anomalies, and accepts serial runs."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykv.sim.listappend import Txn, check_serializable


def app(key, elem):
    return ("append", key, elem)


def rd(key, seen):
    return ("r", key, None if seen is None else tuple(seen))


def ok(tid, *ops, start=None, end=None):
    return Txn(id=tid, ops=tuple(ops), committed=True, start=start, end=end)


# --- cycles -----------------------------------------------------------------------------------


def test_empty_and_trivial_histories_are_serializable():
    assert check_serializable([]).ok
    assert check_serializable([ok(1, app("x", 1)), ok(2, rd("x", [1]))]).ok


def test_g0_write_cycle_is_reported_with_ww_edges():
    history = [
        ok(1, app("x", 1), app("y", 1)),
        ok(2, app("x", 2), app("y", 2)),
        ok(3, rd("x", [1, 2]), rd("y", [2, 1])),  # x says T1 first, y says T2 first
    ]
    result = check_serializable(history)
    assert not result.ok
    assert result.anomalies == ["G0"]
    assert sorted(result.cycle) == [1, 2]
    assert "G0 cycle: T1 -ww(appended 1 then 2 to 'x')-> T2 -ww(" in result.explanation


def test_g1c_circular_information_flow_is_reported():
    history = [
        ok(1, app("x", 1), rd("y", [2])),
        ok(2, app("y", 2), rd("x", [1])),
    ]
    result = check_serializable(history)
    assert result.anomalies == ["G1c"]
    assert sorted(result.cycle) == [1, 2]
    assert "-wr(" in result.explanation and "-rw(" not in result.explanation


def test_g2_write_skew_is_reported_with_two_anti_dependencies():
    history = [
        ok(1, rd("x", None), rd("y", None), app("x", 1)),
        ok(2, rd("x", None), rd("y", None), app("y", 2)),
        ok(3, rd("x", [1]), rd("y", [2])),
    ]
    result = check_serializable(history)
    assert result.anomalies == ["G2-item"]
    assert sorted(result.cycle) == [1, 2]
    assert result.explanation.count("-rw(") == 2


def test_g_single_read_skew_is_reported():
    history = [
        ok(1, app("x", 1), app("y", 1)),
        ok(2, rd("x", []), rd("y", [1])),  # saw T1's y but not its x
    ]
    result = check_serializable(history)
    assert result.anomalies == ["G-single"]
    assert sorted(result.cycle) == [1, 2]


def test_an_unread_append_still_orders_after_the_reads_that_miss_it():
    # Nobody read x after T1 appended, yet T2 read x empty, so T2 precedes T1; and T2 saw
    # T1's y, so T1 precedes T2.
    history = [ok(1, app("x", 1), app("y", 1)), ok(2, rd("x", None), rd("y", [1]))]
    assert check_serializable(history).anomalies == ["G-single"]


def test_lost_update_is_a_cycle():
    history = [
        ok(1, rd("x", []), app("x", 1)),
        ok(2, rd("x", []), app("x", 2)),
        ok(3, rd("x", [1, 2])),
    ]
    result = check_serializable(history)
    assert not result.ok and sorted(result.cycle) == [1, 2]


def test_strict_mode_adds_real_time_order():
    # T2 began after T1 was acknowledged but did not see T1's append: serializable
    # (T2 before T1), but not strictly serializable.
    history = [
        ok(1, app("x", 1), start=0, end=1),
        ok(2, rd("x", []), start=2, end=3),
        ok(3, rd("x", [1]), start=4, end=5),
    ]
    assert check_serializable(history).ok
    result = check_serializable(history, strict=True)
    assert result.anomalies == ["G-single-realtime"]
    assert "-rt(ended at 1, before 2)->" in result.explanation


def test_strict_mode_accepts_concurrent_transactions_in_either_order():
    history = [
        ok(1, app("x", 1), start=0, end=10),
        ok(2, rd("x", []), start=1, end=11),
        ok(3, rd("x", [1]), start=12, end=13),
    ]
    assert check_serializable(history, strict=True).ok


# --- anomalies without cycles -----------------------------------------------------------------


def test_aborted_read_g1a():
    history = [Txn(1, (app("x", 1),), committed=False), ok(2, rd("x", [1]))]
    result = check_serializable(history)
    assert result.anomalies == ["G1a"]
    assert "appended by aborted T1" in result.explanation


def test_intermediate_read_g1b():
    history = [ok(1, app("x", 1), app("x", 2)), ok(2, rd("x", [1]))]
    result = check_serializable(history)
    # Reading the intermediate state also puts T2 both after and before T1: a cycle.
    assert "G1b" in result.anomalies and sorted(result.cycle) == [1, 2]


def test_incompatible_orders():
    history = [ok(1, app("x", 1)), ok(2, app("x", 2)), ok(3, rd("x", [1, 2])), ok(4, rd("x", [2]))]
    result = check_serializable(history)
    assert result.anomalies == ["incompatible-order"]
    assert "not a prefix of [1, 2]" in result.explanation


def test_duplicate_elements_in_a_read_and_duplicate_appends():
    assert (
        "duplicate-elements"
        in check_serializable([ok(1, app("x", 1)), ok(2, rd("x", [1, 1]))]).anomalies
    )
    assert (
        "duplicate-elements"
        in check_serializable([ok(1, app("x", 1)), ok(2, app("x", 1))]).anomalies
    )


def test_read_of_an_element_never_appended():
    result = check_serializable([ok(1, rd("x", [42]))])
    assert result.anomalies == ["garbage-read"]


def test_a_read_must_include_the_transactions_own_appends():
    assert check_serializable([ok(1, app("x", 1), rd("x", [1]))]).ok
    assert check_serializable([ok(1, app("x", 1), rd("x", []))]).anomalies == ["internal"]


def test_unknown_outcome_transactions_count_only_once_observed():
    unknown = Txn(1, (app("x", 1), rd("y", [99])), committed=None)  # its read is ignored
    assert check_serializable([unknown, ok(2, rd("x", []))]).ok
    assert check_serializable([unknown, ok(2, rd("x", [1]))]).ok
    # Once observed it takes part in cycles.
    cyclic = [
        Txn(1, (app("x", 1), app("y", 1)), committed=None),
        ok(2, rd("x", [1]), rd("y", [])),
        ok(3, rd("y", [1])),
    ]
    assert check_serializable(cyclic).anomalies == ["G-single"]


def test_aborted_transactions_reads_do_not_count():
    history = [ok(1, app("x", 1)), Txn(2, (rd("x", [7, 8]),), committed=False)]
    assert check_serializable(history).ok


def test_malformed_input_raises_value_error():
    with pytest.raises(ValueError):
        check_serializable([ok(1, ("write", "x", 1))])
    with pytest.raises(ValueError):
        check_serializable([ok(1), ok(1)])


# --- generated histories ----------------------------------------------------------------------


def run_serially(rng: random.Random, n_txns: int, keys: str, spread: int):
    """Execute random transactions one at a time, in a random order, on a dict of lists.

    Each gets real times around its serial position, so the serial order is consistent
    with real time. Some abort (no effect) and some have an unknown outcome (effect or not).
    """
    store: dict[str, list[int]] = {}
    elems = iter(range(1, 10**9))
    history = []
    for position in range(n_txns):
        fate = rng.choices([True, False, None], weights=[8, 1, 1])[0]
        applies = fate is True or (fate is None and rng.random() < 0.5)
        view = {k: list(v) for k, v in store.items()}
        ops = []
        for _ in range(rng.randint(1, 4)):
            key = rng.choice(keys)
            if rng.random() < 0.5:
                elem = next(elems)
                view.setdefault(key, []).append(elem)
                ops.append(app(key, elem))
            else:
                ops.append(rd(key, view.get(key)))
        if applies:
            store.update(view)
        point = 10 * position
        history.append(
            Txn(
                id=position,
                ops=tuple(ops),
                committed=fate,
                start=point - rng.randint(0, spread),
                end=point + rng.randint(0, spread),
            )
        )
    rng.shuffle(history)
    return history


@settings(deadline=None, max_examples=120)
@given(
    seed=st.integers(0, 2**32),
    n_txns=st.integers(0, 30),
    keys=st.sampled_from(["x", "xy", "xyz"]),
    spread=st.integers(0, 30),
)
def test_serial_executions_are_strictly_serializable(seed, n_txns, keys, spread):
    history = run_serially(random.Random(seed), n_txns, keys, spread)
    for strict in (False, True):
        result = check_serializable(history, strict=strict)
        assert result.ok, result.explanation


@settings(deadline=None, max_examples=80)
@given(seed=st.integers(0, 2**32), n_txns=st.integers(2, 30), data=st.data())
def test_a_lost_append_is_detected(seed, n_txns, data):
    """Drop from a read one element that another read also saw: an anomaly must appear.

    (An element nobody else saw could simply have been appended later, so dropping it
    need not be detectable.)
    """
    history = run_serially(random.Random(seed), n_txns, "xy", spread=5)
    reads = [
        (t, i)
        for t in history
        if t.committed
        for i, op in enumerate(t.ops)
        if op[0] == "r" and op[2] and len(op[2]) >= 2
    ]
    if not reads:
        return
    txn, i = data.draw(st.sampled_from(reads))
    _, key, seen = txn.ops[i]
    seen_elsewhere = [
        g
        for g in range(len(seen) - 1)
        if any(
            op[0] == "r" and op[1] == key and op[2] and seen[g] in op[2]
            for t in history
            if t.committed
            for j, op in enumerate(t.ops)
            if (t, j) != (txn, i)
        )
    ]
    if not seen_elsewhere:
        return
    gap = data.draw(st.sampled_from(seen_elsewhere))
    broken = seen[:gap] + seen[gap + 1 :]
    ops = txn.ops[:i] + (("r", key, broken),) + txn.ops[i + 1 :]
    history = [t if t is not txn else Txn(t.id, ops, t.committed, t.start, t.end) for t in history]
    result = check_serializable(history)
    assert not result.ok


def test_a_large_serial_history_is_checked_quickly():
    history = run_serially(random.Random(3), 3000, "abcdefgh", spread=40)
    result = check_serializable(history, strict=True)
    assert result.ok, result.explanation
