"""A client coordinating a multi-shard commit dies between its phases: the shards settle it.

The client process is armed with a failpoint (PYKV_FAILPOINT) and exits with status 137 in
the middle of two-phase commit. After prepare and before the decision record, every shard
must end up aborting; after the decision record, every shard must end up committing. Until
then the prepared keys are locked and reads of them wait, so no reader sees half of it.
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

from cluster_harness import local_cluster  # noqa: E402

import pykv.client  # noqa: E402

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


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with local_cluster(tmp_path_factory.mktemp("c2pc"), nodes=3, partitions=8) as c:
        yield c


@pytest.fixture(scope="module")
def patient_cluster(tmp_path_factory):
    """Prepares wait a minute for their decision before recovery settles them."""
    with local_cluster(tmp_path_factory.mktemp("c2pc-patient"), nodes=3, partitions=8,
                       recovery_after=60.0) as c:
        yield c


def _keys_on_every_shard(db, prefix: str) -> list[str]:
    core = db.backend.core
    found: dict[int, str] = {}
    i = 0
    while len(found) < core.router.map.partitions:
        found.setdefault(core.shard_of(f"{prefix}{i}"), f"{prefix}{i}")
        i += 1
    return sorted(found.values())


def _settled_everywhere(cluster, timeout: float = 10.0) -> bool:
    """Whether every replica soon holds no prepared transaction and no unreleased commit."""
    deadline = time.monotonic() + timeout
    while True:
        groups = [g for n in (1, 2, 3) for g in cluster.status(n)["groups"].values()]
        if all(g["prepared"] == 0 and g["unfinished"] == 0 for g in groups):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def test_a_commit_is_released_once_every_participant_applied_it(cluster):
    """The coordinator shard keeps a commit's decision until every participant applied it
    (so a participant that was away still finds it), then lets it go: nothing accumulates."""
    with pykv.client.connect(cluster.addresses) as db:
        keys = _keys_on_every_shard(db, "released/")
        for round_ in range(20):
            with db.transaction() as tx:
                for key in keys[round_ % 3::3]:
                    tx.put(key, round_)
        assert _settled_everywhere(cluster)


@pytest.mark.parametrize(
    ("failpoint", "expected"),
    [("txn.2pc.after_prepare", "old"), ("txn.2pc.after_decide", "new")],
)
def test_coordinator_crash_leaves_no_transaction_in_doubt(cluster, failpoint, expected):
    with pykv.client.connect(cluster.addresses) as db:
        keys = _keys_on_every_shard(db, f"{failpoint}/")
        with db.transaction() as tx:
            for key in keys:
                tx.put(key, "old")
        env = dict(os.environ, PYKV_FAILPOINT=failpoint)
        crashed = subprocess.run(
            [sys.executable, "-c", CLIENT, ",".join(cluster.addresses), ",".join(keys)],
            env=env, capture_output=True, text=True, timeout=60,
        )
        assert crashed.returncode == 137, crashed.stderr
        assert "committed" not in crashed.stdout
        # Reads wait for the prepared keys to be settled, then all agree.
        assert [db.get(k) for k in keys] == [expected] * len(keys)
        # Every replica (followers learn the commit index a heartbeat later) unlocks, and
        # the coordinator shard releases a commit once every participant applied it.
        assert _settled_everywhere(cluster)
        # And the keys are writable again.
        with db.transaction() as tx:
            for key in keys:
                tx.put(key, "after")
        assert [db.get(k) for k in keys] == ["after"] * len(keys)


def test_a_dead_clients_prepares_are_settled_when_its_connections_close(patient_cluster):
    """A client killed between prepare and decision leaves its keys locked until recovery
    (here after 60 s); its process's connections close as it dies, and the nodes that took
    its prepares settle them then: the keys are unlocked and readable well within that."""
    cluster = patient_cluster
    with pykv.client.connect(cluster.addresses) as db:
        keys = _keys_on_every_shard(db, "orphan/")
        with db.transaction() as tx:
            for key in keys:
                tx.put(key, "old")
        env = dict(os.environ, PYKV_FAILPOINT="txn.2pc.after_prepare")
        crashed = subprocess.run(
            [sys.executable, "-c", CLIENT, ",".join(cluster.addresses), ",".join(keys)],
            env=env, capture_output=True, text=True, timeout=60,
        )
        assert crashed.returncode == 137, crashed.stderr
        died = time.monotonic()
        assert _settled_everywhere(cluster, timeout=20.0)
        assert time.monotonic() - died < 30.0  # not recovery's 60 s
        counters = [cluster.status(n)["counters"] for n in (1, 2, 3)]
        assert sum(c.get("settles_orphaned", 0) for c in counters) >= 1
        assert sum(c.get("settles_overdue", 0) for c in counters) == 0
        assert [db.get(k) for k in keys] == ["old"] * len(keys)  # no decision: aborted
        with db.transaction() as tx:
            for key in keys:
                tx.put(key, "after")
        assert [db.get(k) for k in keys] == ["after"] * len(keys)
