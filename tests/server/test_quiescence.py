"""Idle shards quiesce on a real 3-node cluster, and a SIGKILLed idle leader is still replaced.

An idle cluster's groups stop heartbeating (pykv.raft.node, quiescence); only one keepalive
per node pair and heartbeat interval keeps flowing. The test checks that from the nodes'
own status and message counters, then SIGKILLs the node leading the most (quiesced) shards:
writes to every shard must succeed through the survivors, and the restarted node catches up.
How long the first writes took after the kill is printed (measured, not asserted).
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster_harness import LocalCluster, local_cluster  # noqa: E402

import pykv.client  # noqa: E402

KEYS = [f"idle/{i:03d}" for i in range(96)]  # spread over every one of the 16 shards


def statuses(cluster: LocalCluster) -> dict[int, dict]:
    return {n: cluster.status(n) for n in sorted(cluster.alive())}


def wait_all_quiesced(cluster: LocalCluster, timeout: float = 30.0) -> dict[int, dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = statuses(cluster)
        if all(g["quiesced"] for s in found.values() for g in s["groups"].values()):
            return found
        time.sleep(0.2)
    raise AssertionError(f"groups still awake after {timeout} s: {found}")


def leadership(found: dict[int, dict]) -> dict[str, tuple[int, int]]:
    """shard -> (leader node, term), as the leaders report it."""
    return {
        shard: (node, g["term"])
        for node, s in found.items() for shard, g in s["groups"].items() if g["role"] == "leader"
    }


def test_an_idle_cluster_quiesces_and_survives_the_kill_of_its_busiest_leader(tmp_path):
    with local_cluster(tmp_path, 3) as cluster:
        db = pykv.client.connect(cluster.addresses, timeout=15.0)
        try:
            for key in KEYS:
                db.put(key, "before")
            found = wait_all_quiesced(cluster)
            before = leadership(found)
            assert len(before) == 16
            sent = {n: s["counters"]["raft_messages_out"] for n, s in found.items()}
            time.sleep(2.0)
            found = wait_all_quiesced(cluster)
            assert leadership(found) == before  # no election while idle: same leaders, terms
            for node, s in found.items():
                # Only keepalives: at most one to each of 2 peers per 100 ms heartbeat (plus
                # slack for the poll); 16 beating groups would send several times more.
                rate = (s["counters"]["raft_messages_out"] - sent[node]) / 2.0
                assert rate <= 2 * 10 * 1.5, f"node {node} sent {rate:.0f} Raft messages/s idle"

            counts: dict[int, int] = {}
            for node, _ in before.values():
                counts[node] = counts.get(node, 0) + 1
            victim = max(counts, key=counts.get)
            cluster.kill(victim)
            start = time.monotonic()
            for key in KEYS:
                db.put(key, "after")
            elapsed = time.monotonic() - start
            print(f"\nkilled node {victim} (leading {counts[victim]} quiesced shards): "
                  f"{len(KEYS)} writes over every shard done {elapsed:.2f} s after the kill")
            after = leadership(statuses(cluster))
            assert len(after) == 16 and victim not in {n for n, _ in after.values()}
            for shard, (node, term) in before.items():
                if node == victim:
                    assert after[shard][1] > term

            cluster.up()  # restarts the killed node
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                mine = cluster.status(victim)["groups"]
                leaders = statuses(cluster)
                commits = {
                    shard: g["commit"] for s in leaders.values()
                    for shard, g in s["groups"].items() if g["role"] == "leader"
                }
                if len(mine) == 16 and all(mine[s]["applied"] >= c for s, c in commits.items()):
                    break
                time.sleep(0.2)
            else:
                raise AssertionError("the restarted node did not catch up")
            assert all(db.get(key) == "after" for key in KEYS)
        finally:
            for node in cluster.alive():
                cluster.signal(node, signal.SIGCONT)
            db.close()
