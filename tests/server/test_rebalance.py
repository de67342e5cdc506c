"""Five nodes with R=3: serve with one node down; a sixth node joins and about 1/N moves;
removing a node moves only the shards it held.

Placement changes are Raft membership changes (learner catch-up from a snapshot, promotion
to voter, removal of the old replica), driven by the metadata group's leader until every
shard's group matches the new shard map.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster_harness import local_cluster  # noqa: E402

import pykv.client  # noqa: E402
from pykv.cluster.ring import HashRing  # noqa: E402
from pykv.server.cmd_cluster import cluster_remove  # noqa: E402

PARTITIONS = 16


def _voters(cluster) -> dict[int, frozenset[int]]:
    """shard -> voters, as the shard's leader reports them."""
    found = {}
    for node_id in cluster.alive():
        for shard, group in cluster.status(node_id)["groups"].items():
            if group["role"] == "leader":
                found[int(shard)] = frozenset(group["voters"])
    return found


def _wait_placed(
    cluster, ring: HashRing, timeout: float = 60.0, partitions: int = PARTITIONS
) -> dict[int, frozenset[int]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        voters = _voters(cluster)
        hosted = {n: {int(g) for g in cluster.status(n)["groups"]} for n in cluster.alive()}
        placed = len(voters) == partitions and all(
            voters[p] == frozenset(ring.replicas(p)) for p in range(partitions)
        ) and all(
            hosted[n] == {p for p in range(partitions) if n in ring.replicas(p)} for n in hosted
        )
        if placed:
            return voters
        time.sleep(0.2)
    raise AssertionError(f"shards not placed per the map within {timeout}s: {_voters(cluster)}")


@pytest.mark.slow
def test_five_nodes_survive_one_down_and_rebalance_when_a_sixth_joins(tmp_path):
    with local_cluster(tmp_path, nodes=5, partitions=PARTITIONS, replicas=3) as cluster:
        five = HashRing([1, 2, 3, 4, 5], partitions=PARTITIONS, vnodes=64, replicas=3)
        before = _wait_placed(cluster, five)
        db = pykv.client.connect(cluster.addresses[:2], timeout=15)
        try:
            for i in range(100):
                db.put(f"key{i}", i)

            cluster.kill(5)  # every shard keeps 2 of its 3 replicas: still a majority
            for i in range(100):
                assert db.get(f"key{i}") == i
            with db.transaction() as tx:
                for i in range(0, 100, 10):
                    tx.put(f"key{i}", -i)

            cluster.up(nodes=6)  # restarts node 5, starts node 6, which joins the map
            six = five.with_node(6)
            after = _wait_placed(cluster, six)
            moved = {p for p in range(PARTITIONS) if before[p] != after[p]}
            expected = five.moved_partitions(six)
            slots = sum(len(before[p] - after[p]) for p in range(PARTITIONS))
            print(f"\n6th node joined: {len(moved)} of {PARTITIONS} partitions changed a replica "
                  f"({slots} of {3 * PARTITIONS} replica slots moved, ~1/6 expected)")
            assert moved == expected
            assert slots == len(expected)  # each moved partition swapped exactly one replica
            assert all(6 in after[p] for p in moved)

            for i in range(100):
                assert db.get(f"key{i}") == (-i if i % 10 == 0 else i)
            db.put("after-rebalance", "ok")
            with pykv.client.connect([cluster.address(6)]) as fresh:
                assert fresh.get("after-rebalance") == "ok"
                assert fresh.get("key10") == -10
        finally:
            db.close()


@pytest.mark.slow
def test_removing_a_node_moves_only_its_shards_away(tmp_path):
    with local_cluster(tmp_path, nodes=4, partitions=8, replicas=3) as cluster:
        four = HashRing([1, 2, 3, 4], partitions=8, vnodes=64, replicas=3)
        before = _wait_placed(cluster, four, partitions=8)
        with pykv.client.connect(cluster.addresses[:1], timeout=15) as db:
            for i in range(50):
                db.put(f"r{i}", i)
            cluster_remove(cluster.data_dir, 4, timeout=60)
            assert 4 not in cluster.alive()
            three = four.without_node(4)
            after = _wait_placed(cluster, three, partitions=8)
            moved = {p for p in range(8) if before[p] != after[p]}
            print(f"\nnode 4 removed: {len(moved)} of 8 partitions changed a replica")
            assert moved == four.moved_partitions(three)
            assert moved == {p for p in range(8) if 4 in before[p]}
            assert [db.get(f"r{i}") for i in range(50)] == list(range(50))
