"""A node removed while it was down drops its metadata-group replica when it comes back.

Nobody can tell a node that is down that it left the metadata group, and a restarted
node finds the group in its WAL: without asking the group's leader it would keep the
replica forever, campaigning in a group that no longer counts it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster_harness import local_cluster  # noqa: E402

import pykv.client  # noqa: E402
from pykv.client.transport import META_GROUP  # noqa: E402
from pykv.server.cmd_cluster import cluster_remove, start_node  # noqa: E402


def _status_or_none(cluster, node_id: int) -> dict | None:
    try:
        return cluster.status(node_id)
    except pykv.Error:
        return None  # still starting


@pytest.mark.slow
def test_a_node_removed_while_down_drops_its_metadata_replica_when_it_returns(tmp_path):
    with local_cluster(tmp_path, nodes=4, partitions=8, replicas=3) as cluster:
        # Nodes 1-3 found the metadata group; node 3 is one of its voters.
        assert cluster.hosts_meta(3)
        with pykv.client.connect([cluster.address(1)], timeout=15) as db:
            for i in range(20):
                db.put(f"m{i}", i)
            cluster.kill(3)  # down while the others take it out: nobody can tell it
            cluster_remove(cluster.data_dir, 3, timeout=60)
            members = cluster.meta_members()
            assert 3 not in members["voters"] + members["learners"]

            start_node(cluster.config, 3, cluster.data_dir)  # back, with its old WAL
            deadline = time.monotonic() + 30
            status = None
            while status is None or status["meta"] is not None or status["groups"]:
                assert time.monotonic() < deadline, f"node 3 still hosts {status}"
                time.sleep(0.2)
                status = _status_or_none(cluster, 3)
            assert f"dropped shard {META_GROUP}:" in cluster.log_text(3)
            # Without a replica it has nothing to campaign in; it still knows the map (learned
            # from the others), in which it has no place.
            assert not cluster.hosts_meta(3)
            assert 3 not in status["map_nodes"]
            after = cluster.meta_members()
            assert 3 not in after["voters"] + after["learners"]
            assert [db.get(f"m{i}") for i in range(20)] == list(range(20))
