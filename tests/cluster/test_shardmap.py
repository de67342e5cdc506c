"""Shard maps round-trip through bytes, and rebalancing plans are safe and complete."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykv.cluster.shardmap import ShardMap, Step, StepKind, next_step
from pykv.codec import pack
from pykv.errors import CorruptData


def cluster(n: int, **kw) -> ShardMap:
    return ShardMap(
        version=1,
        nodes=tuple(range(1, n + 1)),
        addresses={i: f"127.0.0.1:{7400 + i}" for i in range(1, n + 1)},
        **kw,
    )


def test_encode_decode_round_trip():
    m = cluster(5, partitions=64).with_leader(3, 2).with_node("extra", "10.0.0.9:7401")
    again = ShardMap.decode(m.encode())
    assert again == m
    assert again.owners("user:1") == m.owners("user:1")
    assert again.leader_hint(3) == 2


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1",
        pack([1, 2, 3]),
        pack({"format": 99}),
        pack({"format": 1, "version": 1}),
        pack(
            {
                "format": 1,
                "version": -1,
                "nodes": [1],
                "addresses": [],
                "partitions": 8,
                "vnodes": 1,
                "replicas": 1,
                "leaders": [],
            }
        ),
    ],
)
def test_decoding_garbage_raises_corrupt_data(data):
    with pytest.raises(CorruptData):
        ShardMap.decode(data)


def test_changes_make_the_next_version_and_leave_the_old_map_alone():
    m = cluster(3)
    bigger = m.with_node(4, "127.0.0.1:7404")
    assert bigger.version == 2 and m.nodes == (1, 2, 3)
    smaller = bigger.with_leader(0, 4).without_node(4)
    assert smaller.version == 3 and 4 not in smaller.addresses and not smaller.leaders


def test_addresses_and_leader_hints_are_validated():
    with pytest.raises(ValueError):
        ShardMap(1, (1, 2), {3: "127.0.0.1:1"})
    with pytest.raises(ValueError):
        ShardMap(1, (1,), {1: "no-port"})
    with pytest.raises(ValueError):
        ShardMap(1, (1,), {1: "host:70000"})
    with pytest.raises(ValueError):
        ShardMap(1, (1,), leaders={300: 1})
    with pytest.raises(ValueError):
        ShardMap(1, (1,), leaders={0: 2})
    with pytest.raises(ValueError):
        cluster(3).address_of(9)


def reach(old, target, leader):
    """Take a group from voters ``old`` to ``target`` by next_step, checking the safety rules
    at each step (a promotion as the leader allows it: the learner has caught up)."""
    voters, learners = set(old), set()
    floor = min(len(old), len(target))
    steps = []
    while (step := next_step(voters, learners, leader, target)) is not None:
        steps.append(step)
        assert len(steps) <= 2 * (len(old) + len(target)), f"no end: {steps}"
        if step.kind is StepKind.ADD_LEARNER:
            assert step.node not in voters | learners
            learners.add(step.node)
        elif step.kind is StepKind.PROMOTE:
            learners.remove(step.node)  # only a learner may be promoted
            voters.add(step.node)
        elif step.kind is StepKind.TRANSFER_LEADER:
            assert step.node in voters and step.node in target
            leader = step.node
        else:
            assert step.node != leader, "the leader is removed only after a transfer"
            voters.discard(step.node)
            learners.discard(step.node)
            assert len(voters) >= floor
    assert voters == set(target) and not learners
    return steps


@settings(deadline=None, max_examples=30)
@given(
    n=st.integers(1, 8),
    replicas=st.integers(1, 5),
    change=st.sampled_from(["add", "remove", "replace"]),
    leader_index=st.integers(0, 4),
)
def test_steps_reach_the_new_replica_sets_safely(n, replicas, change, leader_index):
    old = cluster(n, partitions=64, vnodes=16, replicas=replicas)
    if change == "add" or n == 1:
        new = old.with_node(100, "127.0.0.1:7500")
    elif change == "remove":
        new = old.without_node(1)
    else:
        new = old.with_node(100, "127.0.0.1:7500").without_node(2)
    for p in range(64):
        before, after = old.replicas_of(p), new.replicas_of(p)
        steps = reach(before, after, before[leader_index % len(before)])
        assert bool(steps) == (set(before) != set(after))


def test_a_leader_that_leaves_hands_over_first_and_leaves_last():
    steps = reach([1, 2, 3], [2, 4, 5], leader=1)
    kinds = [(s.kind, s.node) for s in steps]
    assert kinds == [
        (StepKind.ADD_LEARNER, 4), (StepKind.ADD_LEARNER, 5), (StepKind.PROMOTE, 4),
        (StepKind.PROMOTE, 5), (StepKind.REMOVE, 3), (StepKind.TRANSFER_LEADER, 2),
        (StepKind.REMOVE, 1),
    ]


def test_a_learner_the_target_no_longer_names_is_removed_unpromoted():
    assert next_step([1, 2, 3], [4], 1, [1, 2, 3]) == Step(StepKind.REMOVE, 4)
    assert next_step([1, 2, 3], [4], 1, [1, 2, 4]) == Step(StepKind.PROMOTE, 4)
    assert next_step([1, 2, 3], [], 2, [3, 2, 1]) is None
