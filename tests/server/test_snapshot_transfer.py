"""A replica catches up from a snapshot whose image is many times larger than a frame:
real node processes on 127.0.0.1, values on disk, the follower killed with SIGKILL while
the leader writes and compacts its log, then restarted."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster_harness import local_cluster  # noqa: E402

import pykv.client  # noqa: E402
from pykv.replica.stored import StoredShardState  # noqa: E402

VALUES = 96
VALUE_BYTES = 64 << 10  # 96 incompressible values: 6 MiB of image, frames of 2 MiB at most


@pytest.mark.slow
def test_a_follower_catches_up_from_a_snapshot_larger_than_a_frame(tmp_path):
    with local_cluster(tmp_path, nodes=3, partitions=1, replicas=3, max_frame_mb=2.0,
                       snapshot_every=20) as cluster:
        values = {f"big/{i:03d}": os.urandom(VALUE_BYTES) for i in range(VALUES)}
        with pykv.client.connect(cluster.addresses[:2], timeout=20) as db:
            db.put("before", 1)
            cluster.kill(3)
            for key, value in values.items():
                db.put(key, value)  # one entry each: the leader's log is compacted 4 times
            leader = cluster.leader_of(0, among=[1, 2])
            assert leader is not None
            target = cluster.status(leader)["groups"]["0"]["commit"]
            assert target > 3 * 20

            cluster.up()  # node 3 comes back: its log ends before the leader's snapshot
            deadline = time.monotonic() + 60
            while True:
                assert time.monotonic() < deadline, "node 3 did not catch up"
                try:
                    status = cluster.status(3)
                except pykv.Error:
                    status = None  # still starting
                if status is not None and status["groups"]["0"]["applied"] >= target:
                    break
                time.sleep(0.2)
            assert status["snapshots"]["received"] >= 1
            sent = sum(cluster.status(n)["snapshots"]["sent"] for n in (1, 2))
            assert sent >= 1
            assert db.get("big/000") == values["big/000"]

        # What node 3 holds on disk, read back from its own files once it is gone.
        cluster.kill(3)
        shard = StoredShardState(0, cluster.data_dir / "node-3" / "shards" / "g0")
        try:
            assert shard.get("before").value == 1
            held = {key: shard.get(key).value for key in values}
        finally:
            shard.close()
        assert held == values


@pytest.mark.slow
def test_a_follower_down_a_short_while_catches_up_from_the_log_not_a_snapshot(tmp_path):
    """The leader compacts its log while a follower is down, but keeps the entries that
    follower has not matched (up to half a snapshot interval: RaftConfig.catch_up_entries),
    so on restart it catches up from them: no image is made or sent."""
    with local_cluster(tmp_path, nodes=3, partitions=1, replicas=3, snapshot_every=40) as cluster:
        with pykv.client.connect(cluster.addresses[:2], timeout=20) as db:
            for i in range(30):
                db.put(f"a{i}", i)
            leader = cluster.leader_of(0)
            assert leader is not None
            victim = next(n for n in (1, 2, 3) if n != leader)
            _wait_applied(cluster, victim, cluster.status(leader)["groups"]["0"]["commit"])
            cluster.kill(victim)
            for i in range(25):
                db.put(f"b{i}", i)  # past 40 applied entries: the leader snapshots
            group = cluster.status(leader)["groups"]["0"]
            assert group["snapshot"] >= 40, group
            cluster.up()
            _wait_applied(cluster, victim, group["commit"])
            assert cluster.status(victim)["snapshots"]["received"] == 0
            assert cluster.status(leader)["snapshots"]["sent"] == 0
            assert db.get("b24") == 24


def _wait_applied(cluster, node_id: int, index: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, f"node {node_id} did not apply {index}"
        try:
            if cluster.status(node_id)["groups"]["0"]["applied"] >= index:
                return
        except pykv.Error:
            pass  # still starting
        time.sleep(0.1)
