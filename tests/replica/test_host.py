"""ReplicaHost driven in-process: three nodes, real WALs on disk, messages passed by hand.

The host is the same driver the server runs (persist, then send, then apply, then
advance); here a test loop stands in for the network, so restarts and lagging replicas
are deterministic.
"""

from __future__ import annotations

import random
from pathlib import Path

from pykv.raft.node import RaftConfig
from pykv.replica.durable import NodeLog
from pykv.replica.host import ReplicaHost
from pykv.replica.shard import COMMIT
from pykv.txn.model import CommitRequest, WriteOp
from pykv.types import OpKind

GROUP = 0


class Cluster:
    def __init__(self, root: Path, *, snapshot_every: int = 10_000) -> None:
        self.root = root
        self.snapshot_every = snapshot_every
        self.hosts: dict[int, ReplicaHost] = {}
        self.inbox: list = []
        self.down: set[int] = set()
        for node in (1, 2, 3):
            self.start(node)

    def start(self, node: int) -> None:
        host = ReplicaHost(
            node,
            NodeLog(self.root / f"n{node}"),
            raft_config=RaftConfig(election_ticks=10, heartbeat_ticks=1),
            rng=random.Random(node),
            snapshot_every=self.snapshot_every,
        )
        host.add_group(GROUP, [1, 2, 3])
        self.hosts[node] = host
        self.down.discard(node)

    def crash(self, node: int) -> None:
        self.hosts[node].log.close()
        self.down.add(node)

    def round(self) -> None:
        for node, host in self.hosts.items():
            if node in self.down:
                continue
            host.tick()
            batch = host.collect()
            host.persist(batch)
            self.inbox += batch.early + batch.late
            host.apply(batch)
        inbox, self.inbox = self.inbox, []
        for msg in inbox:
            if msg.to not in self.down:
                self.hosts[msg.to].step(msg)

    def run_until(self, condition, rounds: int = 500) -> None:
        for _ in range(rounds):
            if condition():
                return
            self.round()
        raise AssertionError("condition not reached")

    def leader(self) -> ReplicaHost | None:
        for node, host in self.hosts.items():
            if node not in self.down and host.groups[GROUP].raft.is_leader():
                return host
        return None

    def commit(self, txid: int, key: str, value) -> None:
        self.run_until(lambda: self.leader() is not None)
        done: list = []
        request = CommitRequest(txid, 1, {}, (WriteOp(key, OpKind.PUT, value),))
        self.leader().propose(GROUP, COMMIT, [request.to_wire()], lambda r, e: done.append((r, e)))
        self.run_until(lambda: bool(done))
        assert done == [(None, None)]

    def value(self, node: int, key: str):
        return self.hosts[node].groups[GROUP].state.get(key).value


def test_a_commit_is_applied_by_every_replica(tmp_path):
    c = Cluster(tmp_path)
    c.commit(1, "k", "v")
    c.run_until(lambda: all(c.value(n, "k") == "v" for n in (1, 2, 3)))


def test_a_linearizable_read_on_the_leader_sees_the_latest_commit(tmp_path):
    c = Cluster(tmp_path)
    c.commit(1, "k", "v1")
    c.commit(2, "k", "v2")
    seen: list = []
    c.leader().read(GROUP, lambda state: state.get("k").value, ("k",), lambda r, e: seen.append(r))
    c.run_until(lambda: bool(seen))
    assert seen == ["v2"]


def test_a_restarted_replica_recovers_its_log_from_the_wal(tmp_path):
    c = Cluster(tmp_path)
    for i in range(5):
        c.commit(i + 1, f"k{i}", i)
    c.run_until(lambda: all(c.value(3, f"k{i}") == i for i in range(5)))
    c.crash(3)
    c.start(3)  # a new host over the same data directory
    assert c.hosts[3].groups[GROUP].raft.last_index() >= 6
    c.run_until(lambda: all(c.value(3, f"k{i}") == i for i in range(5)))


def test_every_replica_restarting_keeps_every_acknowledged_commit(tmp_path):
    c = Cluster(tmp_path)
    for i in range(5):
        c.commit(i + 1, f"k{i}", i)
    for node in (1, 2, 3):
        c.crash(node)
    for node in (1, 2, 3):
        c.start(node)
    c.run_until(lambda: c.leader() is not None)
    c.commit(99, "after", "restart")
    c.run_until(lambda: all(c.value(n, f"k{i}") == i for n in (1, 2, 3) for i in range(5)))


def test_a_lagging_replica_catches_up_from_a_snapshot(tmp_path):
    c = Cluster(tmp_path, snapshot_every=5)
    c.commit(1, "first", 0)
    c.crash(3)
    for i in range(20):
        c.commit(i + 2, f"k{i}", i)
    leader = c.leader()
    assert leader.groups[GROUP].raft.log.offset > 1  # the log before the snapshot is gone
    c.start(3)
    c.run_until(lambda: all(c.value(3, f"k{i}") == i for i in range(20)))
    assert (tmp_path / "n3" / "snap" / f"g{GROUP}.snap").exists()
    # And it restarts from that snapshot plus the log after it.
    c.crash(3)
    c.start(3)
    group = c.hosts[3].groups[GROUP]
    assert group.raft.log.offset >= 5 and group.state.applied_index == group.raft.log.offset
    c.run_until(lambda: all(c.value(3, f"k{i}") == i for i in range(20)))
