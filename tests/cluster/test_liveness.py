"""The rules for removing a dead member: only the dead, only with R live members left, one at a time."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykv.cluster.liveness import decide_removal
from pykv.errors import InvalidArgument

RULES = {"replicas": 3, "dead_after": 300.0, "live_within": 3.0}


def test_a_member_silent_for_dead_after_is_removed():
    verdict = decide_removal([1, 2, 3, 4, 5], {5: 300.0}, **RULES)
    assert verdict.node == 5
    assert verdict.dead == (5,)
    assert verdict.live == (1, 2, 3, 4)


def test_a_member_back_before_the_timeout_is_left_alone():
    # Silent for a while, then heard from again: its silence starts over.
    assert decide_removal([1, 2, 3, 4, 5], {5: 299.9}, **RULES).node is None
    assert decide_removal([1, 2, 3, 4, 5], {5: 0.1}, **RULES).node is None


def test_nothing_is_removed_when_fewer_than_r_live_members_would_remain():
    # 3 nodes, R=3: there is nowhere to move the dead node's replicas to.
    verdict = decide_removal([1, 2, 3], {3: 1000.0}, **RULES)
    assert verdict.node is None
    assert verdict.dead == (3,)
    assert "only 2 live" in verdict.reason
    # 4 nodes with one dead and one merely suspect (silent, not yet dead): 2 live, no removal.
    assert decide_removal([1, 2, 3, 4], {3: 1000.0, 4: 10.0}, **RULES).node is None
    # 4 nodes with one dead and 3 live: removed.
    assert decide_removal([1, 2, 3, 4], {3: 1000.0}, **RULES).node == 3


def test_one_at_a_time_the_longest_silent_first():
    silence = {4: 400.0, 5: 500.0}
    verdict = decide_removal([1, 2, 3, 4, 5], silence, **RULES)
    assert verdict.node == 5 and verdict.dead == (5, 4)
    # The map now lacks 5 and its shards move: node 4 waits until they are placed ...
    waiting = decide_removal([1, 2, 3, 4], silence, moving=True, map_age=10.0, **RULES)
    assert waiting.node is None and "still move" in waiting.reason
    assert decide_removal([1, 2, 3, 4], silence, moving=False, map_age=10.0, **RULES).node == 4
    # ... or, when the moves cannot finish (they may wait on node 4), for dead_after more.
    assert decide_removal([1, 2, 3, 4], silence, moving=True, map_age=300.0, **RULES).node == 4


def test_ties_go_to_the_lowest_id():
    assert decide_removal([1, 2, 3, 4, 5, 6], {6: 300.0, 4: 300.0}, **RULES).node == 4


def test_members_without_a_figure_count_as_just_heard_from():
    # A new leader starts every timer at its election: nobody is dead at once.
    verdict = decide_removal([1, 2, 3, 4, 5], {}, **RULES)
    assert verdict.node is None and verdict.live == (1, 2, 3, 4, 5)


def test_bad_settings_are_refused():
    with pytest.raises(InvalidArgument):
        decide_removal([1, 2, 3], {}, replicas=3, dead_after=0, live_within=1)


@given(
    st.lists(st.floats(min_value=0, max_value=1000), min_size=1, max_size=9),
    st.integers(min_value=1, max_value=5),
    st.booleans(),
    st.floats(min_value=0, max_value=1000),
)
def test_a_removed_member_is_always_dead_and_r_live_members_remain(quiet, replicas, moving, age):
    nodes = list(range(1, len(quiet) + 1))
    silence = dict(zip(nodes, quiet, strict=True))
    verdict = decide_removal(
        nodes, silence, replicas=replicas, dead_after=300.0, live_within=3.0, moving=moving, map_age=age
    )
    if verdict.node is not None:
        assert silence[verdict.node] >= 300.0
        assert len([n for n in nodes if n != verdict.node and silence[n] < 3.0]) >= replicas
        assert not (moving and age < 300.0)
        assert silence[verdict.node] == max(silence.values())
