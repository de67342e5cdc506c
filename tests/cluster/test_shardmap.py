"""Shard maps round-trip through bytes, and rebalancing plans are safe and complete."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykv.cluster.shardmap import ShardMap, StepKind, plan_rebalance
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


def apply_steps(move):
    """Replay a move's steps, checking the safety rules as it goes; return the voters."""
    voters, learners = list(move.old), set()
    leader = move.old[0]
    floor = min(len(move.old), len(move.new))
    for step in move.steps:
        if step.kind is StepKind.ADD_LEARNER:
            assert step.node not in voters
            learners.add(step.node)
        elif step.kind is StepKind.PROMOTE:
            learners.remove(step.node)  # only a learner may be promoted
            voters.append(step.node)
        elif step.kind is StepKind.TRANSFER_LEADER:
            assert step.node in voters and step.node in move.new
            leader = step.node
        else:
            assert step.node != leader, "the leader is removed only after a transfer"
            voters.remove(step.node)
            assert len(voters) >= floor
    assert not learners
    return voters


@settings(deadline=None, max_examples=30)
@given(
    n=st.integers(1, 8),
    replicas=st.integers(1, 5),
    change=st.sampled_from(["add", "remove", "replace"]),
)
def test_plans_reach_the_new_replica_sets_safely(n, replicas, change):
    old = cluster(n, partitions=64, vnodes=16, replicas=replicas)
    if change == "add" or n == 1:
        new = old.with_node(100, "127.0.0.1:7500")
    elif change == "remove":
        new = old.without_node(1)
    else:
        new = old.with_node(100, "127.0.0.1:7500").without_node(2)
    moves = plan_rebalance(old, new)
    assert [m.partition for m in moves] == sorted(old.ring.moved_partitions(new.ring))
    for move in moves:
        assert move.old == old.replicas_of(move.partition)
        assert move.new == new.replicas_of(move.partition)
        assert set(apply_steps(move)) == set(move.new)


def test_a_hinted_leader_that_leaves_hands_over_first():
    old = cluster(4, partitions=16)
    p = next(p for p in range(16) if 1 in old.replicas_of(p))
    old = old.with_leader(p, 1)
    new = old.without_node(1)
    (move,) = [m for m in plan_rebalance(old, new) if m.partition == p]
    kinds = [s.kind for s in move.steps]
    assert kinds[-2:] == [StepKind.TRANSFER_LEADER, StepKind.REMOVE]
    assert move.steps[-1].node == 1


def test_plans_need_a_newer_map_with_the_same_partitions():
    m = cluster(3)
    with pytest.raises(ValueError):
        plan_rebalance(m, m)
    with pytest.raises(ValueError):
        plan_rebalance(m, ShardMap(2, m.nodes, partitions=128))
    assert plan_rebalance(m, ShardMap(2, m.nodes)) == []
