"""A node unreachable for --dead-after seconds is replaced: the metadata leader takes it out
of the shard map (as `pykv cluster remove` would) and its shards move to live nodes; never
when fewer than R live nodes would remain.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster_harness import local_cluster  # noqa: E402

import pykv.client  # noqa: E402

REMOVED = re.compile(r"event=dead_member_removed node=(\d+) ")
KEPT = re.compile(r"event=dead_member_kept nodes=(\S+) ")


def _logged(cluster, pattern: re.Pattern) -> list[str]:
    return [m.group(1) for n in cluster.config.nodes for m in pattern.finditer(cluster.log_text(n))]


def _wait(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = condition()
        except pykv.Error:
            found = None  # a node busy electing or moving: ask again
        if found:
            return found
        assert time.monotonic() < deadline, f"{what} not within {timeout}s"
        time.sleep(0.2)


def _map_nodes(cluster) -> set[int]:
    """The shard map's members as a live node reports them."""
    return set(cluster.status(min(cluster.alive()))["map_nodes"])


def _placed_on_live_voters(cluster, partitions: int, replicas: int) -> dict[int, list[int]] | None:
    """shard -> voters when every shard's leader reports ``replicas`` live voters, no learner."""
    alive = set(cluster.alive())
    found = {}
    for node_id in alive:
        for shard, group in cluster.status(node_id)["groups"].items():
            if group["role"] == "leader":
                found[int(shard)] = group
    placed = len(found) == partitions and all(
        len(g["voters"]) == replicas and set(g["voters"]) <= alive and not g["learners"]
        for g in found.values()
    )
    return {s: g["voters"] for s, g in found.items()} if placed else None


@pytest.mark.slow
@pytest.mark.parametrize("role", ["meta-follower", "meta-leader"])
def test_a_dead_node_is_replaced_and_its_shards_move_to_live_nodes(tmp_path, role):
    with local_cluster(tmp_path, nodes=5, partitions=8, replicas=3, dead_after=3.0) as cluster:
        acked: dict[str, int] = {}
        with pykv.client.connect(cluster.addresses[:2], timeout=15) as db:

            def write(tag: str, count: int = 20) -> None:
                for i in range(count):
                    db.put(f"{tag}{i}", i)
                    acked[f"{tag}{i}"] = i

            write("before")
            # A voter of the metadata group, so that the group must move too; its leader is
            # the one that judges: killed, a new leader judges from its election on.
            meta = cluster.meta_members()
            followers = [n for n in meta["voters"] if n != meta["leader"]]
            victim = meta["leader"] if role == "meta-leader" else max(followers)
            held = {int(s) for s in cluster.status(victim)["groups"]}
            assert held, "the victim holds no shard: nothing would move"
            cluster.kill(victim)
            killed = time.monotonic()
            write("while-dead")  # every shard keeps a majority of its replicas

            _wait(lambda: victim not in _map_nodes(cluster), 30, f"node {victim} taken out of the map")
            removed_after = time.monotonic() - killed
            voters = _wait(lambda: _placed_on_live_voters(cluster, 8, 3), 45,
                           "every shard on 3 live voters")
            placed_after = time.monotonic() - killed
            print(f"\n{role} node {victim} killed: out of the map after {removed_after:.1f}s, its "
                  f"{len(held)} shards on live voters after {placed_after:.1f}s")
            assert all(victim not in v for v in voters.values())
            assert _logged(cluster, REMOVED) == [str(victim)]  # one node removed, once
            members = cluster.meta_members()
            assert len(members["voters"]) == 3 and victim not in members["voters"]

            write("after")
            assert {k: db.get(k) for k in acked} == acked

            # `cluster up` brings the removed node back, which finds itself out of the map:
            # up returns (nothing waits for it), records it as removed and stops it.
            cluster.up(timeout=30)
            assert victim in cluster.config.removed
            assert victim not in cluster.alive()
            assert {k: db.get(k) for k in acked} == acked


@pytest.mark.slow
def test_a_dead_node_is_kept_when_fewer_than_r_live_nodes_would_remain(tmp_path):
    with local_cluster(tmp_path, nodes=3, partitions=4, replicas=3, dead_after=3.0) as cluster:
        with pykv.client.connect(cluster.addresses[:2], timeout=15) as db:
            db.put("k", 1)
            cluster.kill(3)
            # The metadata leader sees node 3 dead and says why it leaves it in the map.
            kept = _wait(lambda: _logged(cluster, KEPT), 30, "the dead node seen and kept")
            assert kept[0] == "3"
            assert _map_nodes(cluster) == {1, 2, 3}
            assert _logged(cluster, REMOVED) == []
            db.put("k", 2)  # 2 of 3 replicas: still a majority everywhere
            cluster.up()  # node 3 comes back, still a member, and catches up
            _wait(lambda: _placed_on_live_voters(cluster, 4, 3), 30, "every shard on 3 live voters")
            assert _map_nodes(cluster) == {1, 2, 3}
            assert db.get("k") == 2
