"""The hash ring is stable, balanced, and moves only about 1/N of the replicas on a change."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykv.cluster.ring import HashRing, key_hash

node_names = st.lists(
    st.one_of(st.integers(0, 10_000), st.text(min_size=1, max_size=12)),
    min_size=1,
    max_size=12,
    unique_by=lambda n: (type(n), n),
)


def slot_moves(old: HashRing, new: HashRing) -> int:
    """Replica slots that must be filled by a node that did not hold them before."""
    return sum(len(set(new.replicas(p)) - set(old.replicas(p))) for p in range(old.partitions))


def test_hash_is_stable_across_versions_and_processes():
    # Golden values: a change here would move every key of every existing cluster.
    assert key_hash(b"hello") == 2794345569481354659
    assert key_hash("hello") == key_hash(b"hello")
    ring = HashRing([1, 2, 3, 4, 5])
    assert ring.partition_of(b"hello") == (2794345569481354659 * 256) >> 64
    assert ring.replicas(0) == HashRing([5, 4, 3, 2, 1]).replicas(0)


@settings(deadline=None, max_examples=40)
@given(nodes=node_names, data=st.data())
def test_the_ring_depends_only_on_the_set_of_nodes(nodes, data):
    shuffled = data.draw(st.permutations(nodes))
    a = HashRing(nodes, partitions=64, vnodes=8)
    b = HashRing(shuffled, partitions=64, vnodes=8)
    assert a == b
    assert [a.replicas(p) for p in range(64)] == [b.replicas(p) for p in range(64)]


@settings(deadline=None, max_examples=40)
@given(nodes=node_names, replicas=st.integers(1, 5))
def test_replica_sets_are_distinct_nodes_of_size_min_r_n(nodes, replicas):
    ring = HashRing(nodes, partitions=32, vnodes=8, replicas=replicas)
    for p in range(32):
        chosen = ring.replicas(p)
        assert len(chosen) == min(replicas, len(nodes)) == len(set(chosen))
        assert set(chosen) <= set(nodes)


@settings(deadline=None, max_examples=60)
@given(keys=st.lists(st.binary(max_size=40), min_size=1, max_size=50), q=st.integers(1, 4096))
def test_keys_map_to_valid_partitions_and_their_owners(keys, q):
    ring = HashRing(["a", "b", "c"], partitions=q, vnodes=4)
    for key in keys:
        p = ring.partition_of(key)
        assert 0 <= p < q
        assert ring.owners(key) == ring.replicas(p)


def test_partitions_cut_the_hash_space_into_equal_ranges():
    ring = HashRing([1], partitions=3, vnodes=1)
    starts = [ring.partition_start(p) for p in range(3)]
    widths = [b - a for a, b in zip(starts, starts[1:] + [1 << 64], strict=True)]
    assert max(widths) - min(widths) <= 1
    for p, start in enumerate(starts):
        assert (start * 3) >> 64 == p  # the first hash of a range maps to that partition


@pytest.mark.parametrize("n", [3, 4, 5, 8, 12])
def test_load_is_balanced_with_the_default_parameters(n):
    ring = HashRing(range(1, n + 1))
    load = ring.load()
    assert sum(load.values()) == 256 * 3
    # Measured max/min replica slots per node: 1.0 (n=3) to 1.4 (n=12); see bench_ring.py.
    assert max(load.values()) / min(load.values()) <= 1.6, load


@settings(deadline=None, max_examples=25)
@given(
    nodes=st.lists(st.text(min_size=1, max_size=8), min_size=3, max_size=10, unique=True),
    newcomer=st.integers(),
)
def test_adding_a_node_moves_about_1_over_n_of_the_slots_and_nothing_else(nodes, newcomer):
    old = HashRing(nodes)
    new = old.with_node(newcomer)
    for p in old.moved_partitions(new):
        before, after = old.replicas(p), new.replicas(p)
        # The only change: the newcomer took one slot; the survivors keep their order.
        assert set(after) - set(before) == {newcomer}
        assert len(set(before) - set(after)) == 1
        assert [n for n in after if n != newcomer] == [n for n in before if n in after]
    ideal = 256 * 3 / (len(nodes) + 1)
    assert slot_moves(old, new) <= 2 * ideal
    assert slot_moves(old, new) == len(old.moved_partitions(new))


@settings(deadline=None, max_examples=25)
@given(nodes=st.lists(st.integers(0, 1000), min_size=4, max_size=10, unique=True), data=st.data())
def test_removing_a_node_moves_only_the_partitions_it_held(nodes, data):
    leaver = data.draw(st.sampled_from(nodes))
    old = HashRing(nodes)
    new = old.without_node(leaver)
    held = {p for p in range(256) if leaver in old.replicas(p)}
    assert old.moved_partitions(new) == held
    for p in held:
        survivors = [n for n in old.replicas(p) if n != leaver]
        assert list(new.replicas(p)[: len(survivors)]) == survivors
    assert slot_moves(old, new) == len(held)


def test_removing_then_adding_back_restores_the_ring():
    ring = HashRing(["a", "b", "c", "d"])
    assert ring.without_node("c").with_node("c") == ring
    assert not ring.without_node("c").with_node("c").moved_partitions(ring)


@pytest.mark.parametrize(
    "make",
    [
        lambda: HashRing([]),
        lambda: HashRing([1, 1]),
        lambda: HashRing([1.5]),
        lambda: HashRing([True]),
        lambda: HashRing([1], partitions=0),
        lambda: HashRing([1], vnodes=0),
        lambda: HashRing([1], replicas=0),
        lambda: HashRing([1]).with_node(1),
        lambda: HashRing([1]).without_node(2),
        lambda: HashRing([1]).replicas(256),
        lambda: HashRing([1]).moved_partitions(HashRing([1], partitions=8)),
    ],
)
def test_bad_parameters_raise_value_error(make):
    with pytest.raises(ValueError):
        make()


def test_int_and_str_node_ids_are_different_nodes():
    ring = HashRing([7, "7"], replicas=2)
    assert set(ring.replicas(0)) == {7, "7"}
