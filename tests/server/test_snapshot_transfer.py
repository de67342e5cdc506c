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
