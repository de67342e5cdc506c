"""Named crash points of the replica driver, armed with PYKV_FAILPOINT in a real node process.

``replica.after_snapshot_install``: a node dies right after installing a snapshot.

``replica.after_persist``: the node dies right after a Ready batch is durable and before
its messages leave (DESIGN §7: between persisting hard state and sending). Restarted, it
must rejoin with everything it acknowledged, and the cluster must lose nothing.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster_harness import local_cluster  # noqa: E402

import pykv.client  # noqa: E402
from pykv.cluster.ring import HashRing  # noqa: E402
from pykv.server.cmd_cluster import save_config, start_node  # noqa: E402


def test_a_node_dying_between_persist_and_send_rejoins_without_loss(tmp_path):
    with local_cluster(tmp_path, nodes=3, partitions=4) as cluster:
        with pykv.client.connect(cluster.addresses, timeout=15) as db:
            for i in range(20):
                db.put(f"before{i}", i)
            cluster.kill(2)
            env = dict(os.environ, PYKV_FAILPOINT="replica.after_persist")
            start_node(cluster.config, 2, cluster.data_dir, env=env)
            # Keep writing: the first batch of entries node 2 makes durable, it dies before
            # acknowledging. Nodes 1 and 3 are a majority, so every write succeeds.
            written = 0
            deadline = time.monotonic() + 30
            while 2 in cluster.alive() or written < 20:
                assert time.monotonic() < deadline, "node 2 did not hit its failpoint"
                db.put(f"during{written}", written)
                written += 1
            assert "Traceback" not in cluster.log_text(2)
            cluster.up()  # restart node 2 normally
            deadline = time.monotonic() + 30
            while True:
                groups = cluster.status(2)["groups"]
                leaders = {g: cluster.status(s["leader"])["groups"][g]["commit"]
                           for g, s in groups.items() if s["leader"]}
                if len(leaders) == len(groups) and all(
                    groups[g]["applied"] >= c for g, c in leaders.items()
                ):
                    break
                assert time.monotonic() < deadline, "node 2 did not catch up"
                time.sleep(0.1)
            cluster.kill(1)  # node 2 must now serve with node 3: it holds everything
            for i in range(20):
                assert db.get(f"before{i}") == i
            for i in range(written):
                assert db.get(f"during{i}") == i


def test_a_new_replica_dying_right_after_installing_a_snapshot_recovers(tmp_path):
    """``replica.after_snapshot_install``: a joining node dies right after installing the
    snapshot a leader sent it (state restored, Raft not yet advanced), then restarts and
    ends up with exactly the data of the other replicas."""
    with local_cluster(tmp_path, nodes=3, partitions=4) as cluster:
        with pykv.client.connect(cluster.addresses, timeout=15) as db:
            for i in range(30):
                db.put(f"k{i}", i)
            config = cluster.config
            config.nodes[4] = f"127.0.0.1:{cluster.base_port + 3}"
            save_config(cluster.data_dir, config)
            env = dict(os.environ, PYKV_FAILPOINT="replica.after_snapshot_install")
            start_node(config, 4, cluster.data_dir, env=env)
            deadline = time.monotonic() + 60
            while 4 in cluster.alive():
                assert time.monotonic() < deadline, "node 4 never installed a snapshot"
                time.sleep(0.05)
            assert "Traceback" not in cluster.log_text(4)
            cluster.up(nodes=4)  # restart node 4 normally; the rebalance completes
            ring = HashRing([1, 2, 3, 4], partitions=4, vnodes=64, replicas=3)
            mine = {str(p) for p in range(4) if 4 in ring.replicas(p)}
            deadline = time.monotonic() + 60
            while True:
                groups = cluster.status(4)["groups"]
                if set(groups) == mine and all(g["leader"] for g in groups.values()):
                    leaders = {s: cluster.status(g["leader"])["groups"][s] for s, g in groups.items()}
                    if all(
                        groups[s]["applied"] >= leaders[s]["commit"]
                        and groups[s]["keys"] == leaders[s]["keys"]
                        for s in mine
                    ):
                        break
                assert time.monotonic() < deadline, f"node 4 did not catch up: {groups}"
                time.sleep(0.1)
            assert [db.get(f"k{i}") for i in range(30)] == list(range(30))
