"""Quiesced groups on ReplicaHost: idle shards cost no messages, and a dead leader is still replaced.

Three hosts with several groups each, real WALs, messages passed by hand (as in
test_host.py), so crashes and pauses are deterministic.
"""

from __future__ import annotations

import random
from pathlib import Path

from pykv.raft.messages import MsgType
from pykv.raft.node import RaftConfig
from pykv.replica.durable import NodeLog
from pykv.replica.host import ReplicaHost
from pykv.replica.shard import COMMIT
from pykv.txn.model import CommitRequest, WriteOp
from pykv.types import OpKind

GROUPS = range(6)
CONFIG = RaftConfig(election_ticks=20, heartbeat_ticks=4, quiesce_ticks=30)


class Nodes:
    def __init__(self, root: Path) -> None:
        self.hosts = {
            n: ReplicaHost(n, NodeLog(root / f"n{n}"), raft_config=CONFIG, rng=random.Random(n))
            for n in (1, 2, 3)
        }
        for host in self.hosts.values():
            for gid in GROUPS:
                host.add_group(gid, [1, 2, 3])
        self.stopped: set[int] = set()  # crashed or paused: no ticks, no messages in or out
        self.sent: list = []  # every message of the last round

    def round(self) -> None:
        inbox = []
        for node, host in self.hosts.items():
            if node in self.stopped:
                continue
            host.tick()
            batch = host.collect()
            host.persist(batch)
            inbox += batch.early + batch.late
            host.apply(batch)
        self.sent = inbox
        for msg in inbox:
            if msg.to not in self.stopped and msg.frm not in self.stopped:
                self.hosts[msg.to].step(msg)

    def run(self, rounds: int) -> list:
        sent = []
        for _ in range(rounds):
            self.round()
            sent += self.sent
        return sent

    def leaders(self) -> dict[int, tuple[int, int]]:
        """gid -> (leader node, term) among the running nodes."""
        return {
            gid: (node, host.groups[gid].raft.term)
            for node, host in self.hosts.items() if node not in self.stopped
            for gid in GROUPS if host.groups[gid].raft.is_leader()
        }

    def quiesced(self) -> bool:
        return all(
            host.groups[gid].raft.quiesced
            for node, host in self.hosts.items() if node not in self.stopped
            for gid in GROUPS
        )

    def commit_everywhere(self, txid: int) -> None:
        """One committed write per group, through its leader."""
        done: list = []
        for gid, (node, _) in self.leaders().items():
            request = CommitRequest(txid + gid, 1, {}, (WriteOp(f"k{gid}", OpKind.PUT, txid),))
            self.hosts[node].propose(gid, COMMIT, [request.to_wire()], lambda r, e: done.append(e))
        for _ in range(200):
            if len(done) == len(GROUPS):
                break
            self.round()
        assert done == [None] * len(GROUPS)


def settled(root: Path) -> Nodes:
    nodes = Nodes(root)
    for _ in range(400):
        nodes.round()
        if len(nodes.leaders()) == len(GROUPS) and nodes.quiesced():
            return nodes
    raise AssertionError("the groups did not elect leaders and quiesce")


def test_idle_groups_exchange_only_one_keepalive_per_node_pair_and_heartbeat(tmp_path):
    nodes = settled(tmp_path)
    before = nodes.leaders()
    sent = nodes.run(40 * CONFIG.heartbeat_ticks)
    assert {m.type for m in sent} == {MsgType.KEEPALIVE}
    leading = {node for node, _ in before.values()}
    # Each node leading a quiesced group tells each of its 2 peers it is alive once per beat,
    # whatever the number of groups (6 here).
    assert len(sent) == 40 * 2 * len(leading)
    assert nodes.leaders() == before  # nobody campaigned: same leaders, same terms


def test_a_write_wakes_an_idle_group_and_it_quiesces_again(tmp_path):
    nodes = settled(tmp_path)
    nodes.commit_everywhere(100)
    assert not nodes.quiesced()
    nodes.run(CONFIG.quiesce_ticks + 2 * CONFIG.heartbeat_ticks)
    assert nodes.quiesced()
    for host in nodes.hosts.values():
        assert all(host.groups[gid].state.get(f"k{gid}").value == 100 for gid in GROUPS)


def test_the_groups_of_a_crashed_idle_leader_elect_new_leaders(tmp_path):
    nodes = settled(tmp_path)
    before = nodes.leaders()
    victim = max({node for node, _ in before.values()}, key=lambda n: sum(
        1 for node, _ in before.values() if node == n))
    nodes.stopped.add(victim)
    for _ in range(10 * CONFIG.election_ticks):
        nodes.round()
        if len(nodes.leaders()) == len(GROUPS):
            break
    after = nodes.leaders()
    assert len(after) == len(GROUPS) and victim not in {node for node, _ in after.values()}
    for gid, (node, term) in before.items():
        if node == victim:
            assert after[gid][1] > term
    nodes.commit_everywhere(200)


def test_a_paused_idle_leader_is_replaced_and_steps_down_when_it_resumes(tmp_path):
    nodes = settled(tmp_path)
    before = nodes.leaders()
    victim = next(node for node, _ in before.values())
    nodes.stopped.add(victim)  # like SIGSTOP: its groups stay quiesced leaders in its memory
    for _ in range(10 * CONFIG.election_ticks):
        nodes.round()
        if len(nodes.leaders()) == len(GROUPS):
            break
    assert victim not in {node for node, _ in nodes.leaders().values()}
    nodes.run(CONFIG.quiesce_ticks + 2 * CONFIG.heartbeat_ticks)
    assert nodes.quiesced()  # the new leaders beat no more, so they tell the victim nothing
    nodes.stopped.discard(victim)  # SIGCONT
    # Its peers hear it again after a long silence and beat the groups they lead once: it
    # learns the newer terms and steps down, without waiting for a client to touch them.
    nodes.run(2 * CONFIG.heartbeat_ticks)
    for gid in GROUPS:
        believers = [n for n, h in nodes.hosts.items() if h.groups[gid].raft.is_leader()]
        assert len(believers) == 1, f"group {gid}: {believers} all think they lead"
        assert nodes.hosts[victim].groups[gid].raft.term == nodes.leaders()[gid][1]
    nodes.commit_everywhere(300)
