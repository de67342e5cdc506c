"""The node coordinating a multi-shard commit dies between its phases: the shards settle it.

Every node is armed with a failpoint (PYKV_FAILPOINT): the one that leads the transaction's
coordinator shard, and so drives its two-phase commit (pykv.server.coordinator), exits with
status 137 in the middle of it. The client dies with it (killed as soon as the node is gone,
long before a new leader could be elected to take its retry), so nobody finishes the commit
for them: the participants must. After prepare and before the decision record, every shard
must end up aborting; after the decision record, every shard must end up committing. Until
then the prepared keys are locked and reads of them wait, so no reader sees half of it.
The node restarts (disarmed) and finds the same outcome.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster_harness import LocalCluster  # noqa: E402

import pykv.client  # noqa: E402
from pykv.server.cmd_cluster import pid_alive  # noqa: E402

CLIENT = textwrap.dedent(
    """
    import sys
    import pykv.client
    db = pykv.client.connect(sys.argv[1].split(","))
    with db.transaction() as tx:
        for key in sys.argv[2].split(","):
            tx.put(key, "new")
    print("committed")
    """
)


@pytest.fixture
def armed_cluster(tmp_path, request):
    """A 3-node cluster whose every node dies at the failpoint ``request.param``."""
    cluster = LocalCluster(tmp_path / "c2pc", 3, partitions=8)
    cluster.env = dict(os.environ, PYKV_FAILPOINT=request.param)
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down()


def _keys_on_every_shard(db, prefix: str) -> list[str]:
    core = db.backend.core
    found: dict[int, str] = {}
    i = 0
    while len(found) < core.router.map.partitions:
        found.setdefault(core.shard_of(f"{prefix}{i}"), f"{prefix}{i}")
        i += 1
    return sorted(found.values())


@pytest.mark.parametrize(
    ("armed_cluster", "expected"),
    [("txn.2pc.after_prepare", "old"), ("txn.2pc.after_decide", "new")],
    indirect=["armed_cluster"],
)
def test_coordinator_crash_leaves_no_transaction_in_doubt(armed_cluster, expected):
    cluster = armed_cluster
    with pykv.client.connect(cluster.addresses) as db:
        keys = _keys_on_every_shard(db, "k/")
        for key in keys:  # one shard per transaction: no two-phase commit, no failpoint
            db.put(key, "old")
        pids = cluster.alive()
        client = subprocess.Popen(
            [sys.executable, "-c", CLIENT, ",".join(cluster.addresses), ",".join(keys)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        dead = _wait_for_a_death(pids, client)
        client.kill()
        out, err = client.communicate(timeout=30)
        assert dead is not None, f"no node died at the failpoint; client said {out!r} {err[-2000:]!r}"
        assert "committed" not in out
        # Reads wait for the prepared keys to be settled, then all agree.
        assert [db.get(k) for k in keys] == [expected] * len(keys)
        cluster.env = None  # restart the dead node disarmed; it must agree too
        cluster.up()
        _wait_until_nothing_is_prepared(cluster)
        assert [db.get(k) for k in keys] == [expected] * len(keys)
        # And the keys are writable again (one shard at a time: the others are still armed).
        for key in keys:
            db.put(key, "after")
        assert [db.get(k) for k in keys] == ["after"] * len(keys)


def _wait_for_a_death(pids: dict[int, int], client: subprocess.Popen) -> int | None:
    """The node that died (polled every few ms, so the client can be stopped before it
    retries against a new leader, which takes an election: hundreds of ms)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and client.poll() is None:
        for node_id, pid in pids.items():
            if not pid_alive(pid):  # also reaps it: the nodes are children of this process
                return node_id
        time.sleep(0.002)
    return None


def _wait_until_nothing_is_prepared(cluster) -> None:
    """Every replica (followers learn the commit index a heartbeat later) unlocks."""
    deadline = time.monotonic() + 15
    while True:
        try:
            statuses = [cluster.status(n) for n in (1, 2, 3)]
            if all(g["prepared"] == 0 for s in statuses for g in s["groups"].values()):
                return
        except pykv.Error:
            pass  # the restarted node is not answering yet
        assert time.monotonic() < deadline, "a prepared transaction was never settled"
        time.sleep(0.05)
