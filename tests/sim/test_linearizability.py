"""The linearizability checker accepts real register histories and rejects impossible ones."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykv.sim.linearizability import Op, check_linearizable


def w(p, key, value, call, ret):
    return Op(process=p, kind="write", key=key, value=value, call=call, ret=ret)


def r(p, key, seen, call, ret):
    return Op(process=p, kind="read", key=key, output=seen, call=call, ret=ret)


def cas(p, key, expected, new, ok, call, ret):
    return Op(process=p, kind="cas", key=key, value=(expected, new), output=ok, call=call, ret=ret)


# --- hand-built histories -------------------------------------------------------------------


def test_empty_history_is_linearizable():
    assert check_linearizable([]).ok


def test_read_after_write_sees_it():
    assert check_linearizable([w(1, "x", 1, 0, 1), r(2, "x", 1, 2, 3)]).ok


def test_read_concurrent_with_write_may_see_old_or_new():
    for seen in (None, 1):
        assert check_linearizable([w(1, "x", 1, 0, 10), r(2, "x", seen, 1, 2)]).ok


def test_stale_read_after_completed_write_is_rejected():
    history = [w(1, "x", 1, 0, 1), w(1, "x", 2, 2, 3), r(2, "x", 1, 4, 5)]
    result = check_linearizable(history)
    assert not result.ok and not result.timed_out
    assert result.key == "x"
    assert "longest linearizable prefix" in result.explanation
    assert "p2 read() -> 1 [4, 5]" in result.explanation
    assert "the register holds 2" in result.explanation


def test_clients_observing_two_concurrent_writes_in_opposite_orders_is_rejected():
    history = [
        w(1, "x", "a", 0, 10),
        w(2, "x", "b", 0, 10),
        r(3, "x", "a", 1, 2),
        r(3, "x", "b", 3, 4),  # client 3 saw a, then b
        r(4, "x", "b", 1, 2),
        r(4, "x", "a", 3, 4),  # client 4 saw b, then a
    ]
    assert not check_linearizable(history).ok
    # Either order alone is fine.
    assert check_linearizable(history[:4]).ok
    assert check_linearizable(history[:2] + history[4:]).ok


def test_cas_succeeding_against_a_value_never_current_is_rejected():
    history = [w(1, "x", 1, 0, 1), cas(2, "x", 5, 6, True, 2, 3)]
    result = check_linearizable(history)
    assert not result.ok
    assert "cas(5 -> 6) -> True" in result.explanation


def test_cas_succeeding_against_an_overwritten_value_is_rejected():
    history = [w(1, "x", 1, 0, 1), w(1, "x", 2, 2, 3), cas(2, "x", 1, 3, True, 4, 5)]
    assert not check_linearizable(history).ok


def test_cas_outcomes_must_match_the_register():
    assert check_linearizable(
        [w(1, "x", 1, 0, 1), cas(2, "x", 1, 2, True, 2, 3), r(3, "x", 2, 4, 5)]
    ).ok
    assert check_linearizable([w(1, "x", 1, 0, 1), cas(2, "x", 7, 2, False, 2, 3)]).ok
    failed_but_matched = [w(1, "x", 1, 0, 1), cas(2, "x", 1, 2, False, 2, 3)]
    result = check_linearizable(failed_but_matched)
    assert not result.ok
    assert "failed, but the register holds the expected 1" in result.explanation


def test_unknown_write_may_take_effect_late_or_never():
    late = [w(1, "x", 1, 0, 1), w(2, "x", 2, 2, None), r(3, "x", 1, 3, 4), r(3, "x", 2, 50, 51)]
    never = [w(1, "x", 1, 0, 1), w(2, "x", 2, 2, None), r(3, "x", 1, 3, 4), r(3, "x", 1, 50, 51)]
    assert check_linearizable(late).ok
    assert check_linearizable(never).ok
    # But it takes effect once: the value cannot disappear and come back.
    flicker = [
        w(1, "x", 1, 0, 1),
        w(2, "x", 2, 2, None),
        r(3, "x", 2, 3, 4),
        r(3, "x", 1, 5, 6),
    ]
    assert not check_linearizable(flicker).ok


def test_unknown_write_cannot_take_effect_before_its_call():
    history = [r(1, "x", 9, 0, 1), w(2, "x", 9, 5, None)]
    assert not check_linearizable(history).ok


def test_unknown_cas_succeeds_only_against_the_expected_value():
    ok = [w(1, "x", 1, 0, 1), cas(2, "x", 1, 2, None, 2, None), r(3, "x", 2, 10, 11)]
    assert check_linearizable(ok).ok
    impossible = [w(1, "x", 1, 0, 1), cas(2, "x", 5, 2, None, 2, None), r(3, "x", 2, 10, 11)]
    assert not check_linearizable(impossible).ok


def test_reads_with_unknown_outcome_carry_no_information():
    assert check_linearizable([w(1, "x", 1, 0, 1), r(2, "x", "garbage", 2, None)]).ok


def test_keys_are_independent_and_the_failing_key_is_named():
    history = [
        w(1, "a", 1, 0, 1),
        r(2, "a", 1, 2, 3),
        w(1, "b", 1, 0, 1),
        r(2, "b", None, 2, 3),  # stale
        w(1, "c", 1, 5, 6),
    ]
    result = check_linearizable(history)
    assert not result.ok and result.key == "b"
    assert "key 'b'" in result.explanation


def test_initial_value_is_configurable():
    assert check_linearizable([r(1, "x", 0, 0, 1)], initial=0).ok
    assert not check_linearizable([r(1, "x", 0, 0, 1)]).ok


def test_list_values_compare_by_content():
    history = [w(1, "x", [1, 2], 0, 1), r(2, "x", [1, 2], 2, 3)]
    assert check_linearizable(history).ok


def test_touching_intervals_count_as_concurrent():
    # The read returns at the instant the write is called: either order is accepted.
    assert check_linearizable([r(1, "x", 1, 0, 5), w(2, "x", 1, 5, 6)]).ok


def test_search_past_the_time_limit_reports_timed_out_not_a_verdict():
    # 16 concurrent writes and a read of a value nobody wrote: the search must try every
    # subset of writes before giving up, far more steps than a zero time limit allows.
    history = [w(p, "x", p, 0, 100) for p in range(16)] + [r(99, "x", "nope", 50, 60)]
    result = check_linearizable(history, time_limit_s=0.0)
    assert not result.ok and result.timed_out
    assert "not proven" in result.explanation


@pytest.mark.parametrize(
    "bad",
    [
        Op(process=1, kind="delete", key="x"),
        Op(process=1, kind="write", key="x", value=1, call=5, ret=4),
        Op(process=1, kind="cas", key="x", value=1, output=True, call=0, ret=1),
        Op(process=1, kind="cas", key="x", value=(1, 2), output=None, call=0, ret=1),
    ],
)
def test_malformed_operations_raise_value_error(bad):
    with pytest.raises(ValueError):
        check_linearizable([bad])


# --- generated histories --------------------------------------------------------------------


def execute(rng: random.Random, n_ops: int, keys: str, spread: int, p_unknown: float):
    """Run n_ops random ops sequentially on a dict; give each a random window around its
    linearization point. Unknown-outcome ops either took effect or never did."""
    store: dict[str, int] = {}
    history = []
    for i in range(n_ops):
        point = 10 * i
        call = point - rng.randint(0, spread)
        ret = point + rng.randint(0, spread)
        key = rng.choice(keys)
        kind = rng.choice(("read", "write", "cas"))
        unknown = rng.random() < p_unknown
        took_effect = not unknown or rng.random() < 0.5
        if kind == "read":
            op = r(i % 5, key, store.get(key), call, ret)
        elif kind == "write":
            value = rng.randint(0, 4)
            if took_effect:
                store[key] = value
            op = w(i % 5, key, value, call, ret)
        else:
            expected, new = rng.choice((None, 0, 1, 2)), rng.randint(0, 4)
            success = store.get(key) == expected
            if success and took_effect:
                store[key] = new
            op = cas(i % 5, key, expected, new, success, call, ret)
        if unknown:
            op = Op(op.process, op.kind, op.key, op.value, None, op.call, None)
        history.append(op)
    return history


# The arguments of execute(): both properties below run over the same executions.
EXECUTIONS = {
    "seed": st.integers(0, 2**32),
    "n_ops": st.integers(1, 40),
    "keys": st.sampled_from(["x", "xy", "xyz"]),
    "spread": st.integers(0, 40),
    "p_unknown": st.sampled_from([0.0, 0.1, 0.3]),
}


@settings(deadline=None, max_examples=150)
@given(**EXECUTIONS)
def test_histories_from_a_sequential_execution_are_accepted(seed, n_ops, keys, spread, p_unknown):
    history = execute(random.Random(seed), n_ops, keys, spread, p_unknown)
    random.Random(seed).shuffle(history)  # the checker must not rely on input order
    result = check_linearizable(history)
    assert result.ok, result.explanation


@settings(deadline=None, max_examples=150)
@given(**EXECUTIONS, data=st.data())
def test_a_read_of_a_value_never_written_is_rejected(seed, n_ops, keys, spread, p_unknown, data):
    history = execute(random.Random(seed), n_ops, keys, spread, p_unknown)
    history.append(r(7, "x", None, -10_000, 10 * n_ops + 100))  # ensure a completed read exists
    reads = [i for i, op in enumerate(history) if op.kind == "read" and op.ret is not None]
    victim = data.draw(st.sampled_from(reads))
    op = history[victim]
    history[victim] = Op(op.process, "read", op.key, None, "never-written", op.call, op.ret)
    result = check_linearizable(history)
    assert not result.ok and not result.timed_out
    assert result.key == op.key
    assert "'never-written'" in result.explanation


def test_a_long_concurrent_history_is_checked_quickly():
    history = execute(random.Random(7), 3000, "xyz", spread=60, p_unknown=0.05)
    result = check_linearizable(history, time_limit_s=30)
    assert result.ok, result.explanation


def test_many_unread_unknown_writes_do_not_blow_up_the_search():
    # 60 crashed writers whose values nobody read, around a real stale read: each could
    # have taken effect or not, which without pruning is 2^60 combinations to refute.
    history = [w(p, "x", f"lost-{p}", 0, None) for p in range(60)]
    history += [w(100, "x", "a", 1, 2), w(100, "x", "b", 3, 4), r(101, "x", "a", 5, 6)]
    result = check_linearizable(history, time_limit_s=20)
    assert not result.ok and not result.timed_out
    # Pruning is exact: an unknown write does matter when a failed cas needs it.
    explained = [w(1, "x", 1, 0, 1), w(2, "x", 2, 2, None), cas(3, "x", 1, 3, False, 5, 6)]
    assert check_linearizable(explained).ok
    assert not check_linearizable([explained[0], explained[2]]).ok
