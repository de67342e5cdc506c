"""A node killed right after it snapshots a stored shard restarts from that snapshot.

A stored shard's storage is its own snapshot: compaction checkpoints it, then lets Raft
drop the log up to its applied index. Entries that carry no command (a new leader's
first, a membership change) advance that index without writing a row, so a checkpoint
taken just after them must still record it, or the restarted node finds its storage
behind its snapshot and refuses to start (what CI once saw after a leadership transfer
and an ADD_LEARNER snapshot).
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster_harness import local_cluster  # noqa: E402

import pykv.client  # noqa: E402
from pykv.client.router import Router  # noqa: E402
from pykv.client.transport import CONF  # noqa: E402
from pykv.cluster.shardmap import StepKind  # noqa: E402


def _transfer(cluster, shard: int, to: int) -> None:
    async def call() -> None:
        router = Router(cluster.addresses, timeout=5.0)
        try:
            await router.call(shard, CONF, [shard, StepKind.TRANSFER_LEADER.value, to])
        finally:
            await router.close()

    asyncio.run(call())


def _wait(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_leader_killed_right_after_snapshotting_its_first_entry_restarts(tmp_path):
    # snapshot_every=1: every replica compacts after each applied batch, so the new
    # leader compacts right after applying its first entry (no command), and nothing
    # else is written before it is killed.
    with local_cluster(tmp_path, nodes=3, partitions=1, replicas=3, snapshot_every=1) as cluster:
        with pykv.client.connect(cluster.addresses, timeout=15) as db:
            for i in range(5):
                db.put(f"k{i}", i)
            old = cluster.leader_of(0)
            new = next(n for n in (1, 2, 3) if n != old)
            commit = cluster.status(old)["groups"]["0"]["commit"]
            # Every command applied (and, snapshot_every=1, checkpointed) everywhere first,
            # so that the new leader's first entry comes alone.
            _wait(lambda: all(cluster.status(n)["groups"]["0"]["applied"] >= commit for n in (1, 2, 3)),
                  "every replica to apply the puts")
            _transfer(cluster, 0, new)
            _wait(lambda: cluster.leader_of(0) == new, f"node {new} to lead")

            def compacted_after_its_first_entry() -> bool:
                group = cluster.status(new)["groups"]["0"]
                return group["snapshot"] == group["applied"] == group["last_index"] > commit

            _wait(compacted_after_its_first_entry, f"node {new} to apply its first entry")
            time.sleep(0.5)  # several flush intervals: nothing more is written
            cluster.kill(new)
            cluster.up()  # raised: "storage at index N, behind its snapshot at N+1"
            _wait(lambda: cluster.status(new)["groups"]["0"]["applied"] >= 1, f"node {new} back")
            db.put("after", "restart")
            assert [db.get(f"k{i}") for i in range(5)] == list(range(5))
            assert db.get("after") == "restart"
