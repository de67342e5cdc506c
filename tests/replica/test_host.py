"""ReplicaHost driven in-process: three nodes, real WALs on disk, messages passed by hand.

The host is the same driver the server runs (persist, then send, then apply, then
advance); here a test loop stands in for the network, so restarts and lagging replicas
are deterministic.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pykv.errors import CorruptData
from pykv.raft.errors import NotLeader
from pykv.raft.node import RaftConfig
from pykv.replica.durable import NodeLog, SnapshotFile
from pykv.replica.finishing import FinishTracker, orphans_to_settle, sweep
from pykv.replica.host import MAX_LOG_SEGMENTS, ReplicaHost, StateImage
from pykv.replica.shard import COMMIT, PREPARE, ShardState
from pykv.replica.stored import StoredShardState
from pykv.txn.model import ABSENT, CommitRequest, WriteOp
from pykv.types import OpKind

GROUP = 0


class Cluster:
    def __init__(
        self, root: Path, *, snapshot_every: int = 10_000, stored: bool = False,
        groups: tuple[int, ...] = (GROUP,), segment_bytes: int = 64 << 20,
    ) -> None:
        self.root = root
        self.snapshot_every = snapshot_every
        self.stored = stored  # shard values on disk (StoredShardState), not in memory
        self.groups = groups
        self.segment_bytes = segment_bytes
        self.hosts: dict[int, ReplicaHost] = {}
        self.inbox: list = []
        self.down: set[int] = set()
        self.paused: set[int] = set()  # like SIGSTOP: no ticks, no messages in or out
        for node in (1, 2, 3):
            self.start(node)

    def start(self, node: int) -> None:
        host = ReplicaHost(
            node,
            NodeLog(self.root / f"n{node}", segment_bytes=self.segment_bytes),
            raft_config=RaftConfig(election_ticks=10, heartbeat_ticks=1),
            rng=random.Random(node),
            snapshot_every=self.snapshot_every,
            state_factory=self._state_factory(node),
        )
        for gid in self.groups:
            host.add_group(gid, [1, 2, 3])
        self.hosts[node] = host
        self.down.discard(node)

    def _state_factory(self, node: int):
        if not self.stored:
            return ShardState
        return lambda gid: StoredShardState(gid, self.root / f"n{node}" / "shards" / f"g{gid}")

    def crash(self, node: int) -> None:
        host = self.hosts[node]
        host.log.close()
        if self.stored:  # the files stay as written; what was not flushed is lost
            for group in host.groups.values():
                group.state.store.close()
        self.down.add(node)

    def round(self) -> None:
        for node, host in self.hosts.items():
            if node in self.down or node in self.paused:
                continue
            host.tick()
            batch = host.collect()
            host.persist(batch)
            self.inbox += batch.early + batch.late
            host.apply(batch)
        inbox, self.inbox = self.inbox, []
        for msg in inbox:
            if msg.to not in self.down and msg.to not in self.paused:
                self.hosts[msg.to].step(msg)

    def run_until(self, condition, rounds: int = 500) -> None:
        for _ in range(rounds):
            if condition():
                return
            self.round()
        raise AssertionError("condition not reached")

    def leader(self) -> ReplicaHost | None:
        for node, host in self.hosts.items():
            live = node not in self.down and node not in self.paused
            if live and host.groups[GROUP].raft.is_leader():
                return host
        return None

    def commit(self, txid: int, key: str, value, reads: dict | None = None):
        """Commit a put through the leader and return its outcome (None: committed)."""
        self.run_until(lambda: self.leader() is not None)
        done: list = []
        request = CommitRequest(txid, 1, reads or {}, (WriteOp(key, OpKind.PUT, value),))
        self.leader().propose(GROUP, COMMIT, [request.to_wire()], lambda r, e: done.append((r, e)))
        self.run_until(lambda: bool(done))
        (outcome, error), = done
        assert error is None
        return outcome

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
    # Raft keeps a handle to the snapshot's file, not the image: memory does not hold a
    # copy of the shard's state. The image is read from the file to be sent.
    assert isinstance(leader.groups[GROUP].raft.log.snapshot.data, SnapshotFile)
    c.start(3)
    c.run_until(lambda: all(c.value(3, f"k{i}") == i for i in range(20)))
    assert (tmp_path / "n3" / "snap" / f"g{GROUP}.snap").exists()
    assert isinstance(c.hosts[3].groups[GROUP].raft.log.snapshot.data, SnapshotFile)
    # And it restarts from that snapshot plus the log after it.
    c.crash(3)
    c.start(3)
    group = c.hosts[3].groups[GROUP]
    assert group.raft.log.offset >= 5 and group.state.applied_index == group.raft.log.offset
    c.run_until(lambda: all(c.value(3, f"k{i}") == i for i in range(20)))


@pytest.mark.parametrize("stored", [False, True], ids=["memory", "stored"])
def test_a_quiet_group_is_snapshotted_so_that_the_shared_wal_stays_bounded(tmp_path, stored):
    """A node's groups share its WAL, and a segment goes once no group needs it. A group
    written once and then never again does not reach snapshot_every: it would keep every
    segment since its write for ever. It is snapshotted once it keeps more than
    MAX_LOG_SEGMENTS alive, the WAL stays a few segments long, and its write survives."""
    quiet = 7
    c = Cluster(tmp_path, snapshot_every=40, stored=stored, groups=(GROUP, quiet), segment_bytes=8192)
    c.run_until(lambda: any(h.groups[quiet].raft.is_leader() for h in c.hosts.values()))
    done: list = []
    leader = next(h for h in c.hosts.values() if h.groups[quiet].raft.is_leader())
    request = CommitRequest(1, 1, {}, (WriteOp("still", OpKind.PUT, "here"),))
    leader.propose(quiet, COMMIT, [request.to_wire()], lambda r, e: done.append(e))
    c.run_until(lambda: done == [None])
    longest = 0
    for i in range(400):
        c.commit(i + 2, f"k{i % 50}", "v" * 200)  # about 50 KB of log on each node
        longest = max(longest, *(len(h.log.wal.segments()) for h in c.hosts.values()))
    # Up to MAX_LOG_SEGMENTS, plus what is written between two checks (4 here; 16 without them).
    assert longest <= MAX_LOG_SEGMENTS + 4, longest
    assert all(h.groups[quiet].snapshot_index >= 2 for h in c.hosts.values())
    for node in (1, 2, 3):
        c.crash(node)
    for node in (1, 2, 3):
        c.start(node)
    assert all(h.groups[quiet].state.get("still").value == "here" for h in c.hosts.values())


def test_only_a_leader_puts_what_it_writes_into_the_read_cache(tmp_path):
    """Followers serve no reads: the values they write would only push the values of the
    shards their node leads out of the node's one read cache. A replica that takes over
    caches its writes from then on, and reads find every value either way."""
    c = Cluster(tmp_path, stored=True)

    def cached() -> dict[int, int]:
        live = {n: h.groups[GROUP].state for n, h in c.hosts.items() if n not in c.down}
        for state in live.values():
            state.flush()  # written, so out of the pending versions
        return {n: state.store.stats()["cache_entries"] for n, state in live.items()}

    for i in range(30):
        c.commit(i + 1, f"k{i}", i)
    c.run_until(lambda: all(c.value(n, "k29") == 29 for n in (1, 2, 3)))
    old = next(n for n, h in c.hosts.items() if h is c.leader())
    counts = cached()
    assert counts[old] >= 25 and all(counts[n] == 0 for n in counts if n != old), counts
    c.crash(old)
    for i in range(30, 60):
        c.commit(i + 1, f"k{i}", i)
    new = next(n for n, h in c.hosts.items() if h is c.leader())
    counts = cached()
    assert counts[new] >= 25 and all(counts[n] == 0 for n in counts if n != new), counts
    c.run_until(lambda: all(c.value(n, f"k{i}") == i for n in (1, 2, 3) if n != old for i in range(60)))


def test_a_stored_shard_is_its_own_snapshot_and_makes_an_image_only_for_a_lagging_replica(tmp_path):
    c = Cluster(tmp_path, snapshot_every=5, stored=True)
    c.commit(1, "first", 0)
    c.crash(3)
    for i in range(20):
        c.commit(i + 2, f"k{i}", i)
    leader = c.leader()
    raft = leader.groups[GROUP].raft
    assert raft.log.offset > 1
    # Compaction wrote no image: the storage, made durable first, is the snapshot.
    assert isinstance(raft.log.snapshot.data, StateImage)
    snap_file = tmp_path / f"n{leader.node_id}" / "snap" / f"g{GROUP}.snap"
    assert SnapshotFile(snap_file, raft.log.offset).load() is None
    c.start(3)  # far behind: the leader makes an image of its live state for it
    c.run_until(lambda: all(c.value(3, f"k{i}") == i for i in range(20)))
    # Installed, its storage is the snapshot: the image's copy left the snapshot file.
    installed = c.hosts[3].groups[GROUP].snapshot_index
    assert installed > 1
    assert SnapshotFile(tmp_path / "n3" / "snap" / f"g{GROUP}.snap", installed).load() is None
    c.crash(3)  # and it restarts from its own storage and the log after the snapshot
    c.start(3)
    c.commit(99, "after", "x")
    c.run_until(lambda: c.value(3, "after") == "x" and c.value(3, "k19") == 19)


def _versions(state):
    return state.get("k")


def test_an_optimistic_read_answers_at_once_on_the_leader_only(tmp_path):
    c = Cluster(tmp_path)
    c.commit(1, "k", "v1")
    answered, version = c.leader().read_now(GROUP, _versions, ("k",))
    assert answered and version.value == "v1"  # no Raft round: nothing was stepped
    follower = next(h for h in c.hosts.values() if h is not c.leader())
    with pytest.raises(NotLeader):
        follower.read_now(GROUP, _versions, ("k",))


def test_an_optimistic_read_waits_for_a_pending_write_or_a_prepared_lock(tmp_path):
    c = Cluster(tmp_path)
    c.commit(1, "k", "v1")
    leader = c.leader()
    done: list = []
    pending = CommitRequest(2, 1, {}, (WriteOp("k", OpKind.PUT, "v2"),))
    leader.propose(GROUP, COMMIT, [pending.to_wire()], lambda r, e: done.append(r), ("k",))
    assert leader.read_now(GROUP, _versions, ("k",)) == (False, None)  # v1 is about to go
    assert leader.read_now(GROUP, lambda s: s.get("other"), ("other",))[0]
    c.run_until(lambda: bool(done))
    assert leader.read_now(GROUP, _versions, ("k",))[1].value == "v2"
    # A prepared (undecided) transaction holds the key: the read waits for its decision.
    prepare = CommitRequest(3, 1, {}, (WriteOp("k", OpKind.PUT, "v3"),))
    leader.propose(GROUP, PREPARE, [prepare.to_wire(), GROUP, [GROUP, 1]], lambda r, e: done.append(r))
    c.run_until(lambda: len(done) == 2)
    assert leader.read_now(GROUP, _versions, ("k",)) == (False, None)


def test_a_stale_optimistic_read_from_a_paused_leader_cannot_commit(tmp_path):
    c = Cluster(tmp_path)
    c.commit(1, "k", "v1")
    old = c.leader()
    c.paused.add(old.node_id)  # frozen: it still believes it leads
    assert c.commit(2, "k", "v2") is None  # the other two elect a leader and move on
    answered, stale = old.read_now(GROUP, _versions, ("k",))
    assert answered and stale.value == "v1"  # optimistic: the old leader cannot know
    outcome = c.commit(3, "derived", "from v1", reads={"k": stale})
    assert outcome is not None and outcome[0] == "TransactionConflict"  # validation catches it
    assert c.hosts[c.leader().node_id].groups[GROUP].state.get("derived") is ABSENT


def test_a_host_beats_all_the_groups_it_leads_on_the_same_tick(tmp_path):
    """Heartbeats of many groups share a tick, so they travel in one frame per peer: an idle
    node with many shards wakes its peers once per heartbeat interval, not once per group."""
    hosts = {
        node: ReplicaHost(
            node, NodeLog(tmp_path / f"n{node}"),
            raft_config=RaftConfig(election_ticks=20, heartbeat_ticks=4), rng=random.Random(node),
        )
        for node in (1, 2, 3)
    }
    groups = range(6)
    for host in hosts.values():
        for gid in groups:
            host.add_group(gid, [1, 2, 3])
    inbox: list = []
    heartbeat_ticks: dict[int, set[int]] = {}  # node -> the host ticks on which it beat
    for tick in range(1, 401):
        for node, host in hosts.items():
            host.tick()
            batch = host.collect()
            host.persist(batch)
            for msg in batch.early + batch.late:
                if msg.type.name == "HEARTBEAT" and msg.context is None:
                    heartbeat_ticks.setdefault(node, set()).add(tick)
                inbox.append(msg)
            host.apply(batch)
        delivered, inbox = inbox, []
        for msg in delivered:
            hosts[msg.to].step(msg)
    leaders = {
        gid: node for node, host in hosts.items() for gid in groups
        if host.groups[gid].raft.is_leader()
    }
    assert sorted(leaders) == list(groups)
    for node in set(leaders.values()):
        ticks = heartbeat_ticks[node]
        assert all(t % 4 == 0 for t in ticks), f"node {node} beat off the shared tick: {ticks}"


def _propose(c: Cluster, txid: int, key: str, value) -> list:
    done: list = []
    request = CommitRequest(txid, 1, {}, (WriteOp(key, OpKind.PUT, value),))
    c.leader().propose(GROUP, COMMIT, [request.to_wire()], lambda r, e: done.append((r, e)))
    return done


def test_commits_go_on_while_a_shard_is_imaged_and_the_image_stays_of_one_index(tmp_path, monkeypatch):
    import io

    from pykv.replica import shard as shard_module

    monkeypatch.setattr(shard_module, "IMAGE_RUN", 4)  # many parts, commits between them
    c = Cluster(tmp_path, stored=True)
    for i in range(30):
        c.commit(i + 1, f"k{i:02d}", i)
    leader = c.leader()
    group = leader.groups[GROUP]
    at = group.state.applied_index
    expected = group.state.snapshot()  # the image taken in one go, for comparison
    parts = leader.image_parts(GROUP)
    image = [next(parts), next(parts)]  # imaging has begun: k00..k03 are in
    for txid, key in ((100, "k00"), (101, "k20"), (102, "k29"), (103, "new")):
        assert c.commit(txid, key, "changed") is None  # not held back
    assert group.state.applied_index > at and c.value(leader.node_id, "k20") == "changed"
    with pytest.raises(Exception, match="already being imaged"):
        next(leader.image_parts(GROUP))
    image += list(parts)
    assert b"".join(image) == expected  # the state as it was when the image began
    copy = ShardState(GROUP)
    copy.restore(io.BytesIO(b"".join(image)))
    assert copy.applied_index == at and copy.get("k20").value == 20
    assert not copy.get("new").clock


def test_an_image_is_abandoned_when_its_group_leaves(tmp_path):
    c = Cluster(tmp_path)
    for i in range(3):
        c.commit(i + 1, f"k{i}", i)
    leader = c.leader()
    parts = leader.image_parts(GROUP)
    next(parts)
    leader.remove_group(GROUP)
    with pytest.raises(CorruptData, match="left this node while it was imaged"):
        list(parts)


def test_the_log_is_not_compacted_while_a_snapshot_travels(tmp_path):
    c = Cluster(tmp_path, snapshot_every=5, stored=True)
    for i in range(8):
        c.commit(i + 1, f"k{i}", i)
    leader = c.leader()
    raft = leader.groups[GROUP].raft
    before = raft.log.offset
    assert before > 0
    leader.snapshot_sending(GROUP, 3, True)  # an image is on its way to node 3
    for i in range(8, 30):
        c.commit(i + 1, f"k{i}", i)
    # Node 3 will resume from the entries after the image's index: they must still be here.
    assert raft.log.offset == before
    leader.snapshot_sending(GROUP, 3, False)
    c.commit(99, "after", 1)
    c.run_until(lambda: raft.log.offset > before)


def _restoring_in_background(tmp_path) -> tuple[Cluster, list]:
    """Node 3 back from a crash, far behind, handing its snapshot's restore over (kept in
    the list returned, as (gid, work, then), for the test to run when it likes)."""
    c = Cluster(tmp_path, snapshot_every=5, stored=True)
    c.commit(1, "first", 0)
    c.crash(3)
    for i in range(20):
        c.commit(i + 2, f"k{i}", i)
    c.start(3)
    handed: list = []
    c.hosts[3].restore_in_background = lambda gid, work, then: handed.append((gid, work, then))
    c.run_until(lambda: bool(handed))
    return c, handed


def test_a_snapshot_restored_off_the_loop_holds_its_group_back_until_it_is_done(tmp_path):
    """With restore_in_background, a replica installing a snapshot hands the restore over
    (to a thread, on a node) and sits out the cycle: no Ready, no flush, no state in its
    status, while its group's Raft still takes messages. Once the restore is handed back,
    the rest of that Ready applies and the replica catches up."""
    c, handed = _restoring_in_background(tmp_path)
    group = c.hosts[3].groups[GROUP]
    assert group.restoring is not None and handed[0][0] == GROUP
    assert group.status()["restoring"] is True
    for _ in range(20):  # held back: the rest of the cluster goes on, this replica waits
        c.round()
    assert group.restoring is not None and c.hosts[3].collect().readies == []
    c.commit(50, "during", "x")  # a quorum without it
    gid, work, then = handed.pop()
    work()  # on the node: the restore thread
    then(None)  # and back on the loop
    assert group.restoring is None and "restoring" not in group.status()
    c.run_until(lambda: c.value(3, "k19") == 19 and c.value(3, "during") == "x")
    assert handed == []  # one snapshot was enough


def test_a_group_that_leaves_while_restoring_is_destroyed_once_the_restore_ends(tmp_path):
    c, handed = _restoring_in_background(tmp_path)
    group = c.hosts[3].groups[GROUP]
    c.hosts[3].remove_group(GROUP)
    assert group.state.path.exists()  # the restore may still be writing there
    _, work, then = handed.pop()
    work()
    then(None)
    assert not group.state.path.exists()


def test_a_stored_shard_snapshotted_right_after_entries_with_no_command_restarts(tmp_path):
    # A new leader's first entry (and a membership change) carries no command. A snapshot
    # taken right after one must still find the storage at its index after a crash: the
    # checkpoint has to record the applied index even when no command changed a row.
    c = Cluster(tmp_path, stored=True)
    for i in range(3):
        c.commit(i + 1, f"k{i}", i)
    old = c.leader()
    c.crash(old.node_id)
    c.run_until(lambda: c.leader() is not None)
    leader = c.leader()
    group = leader.groups[GROUP]
    c.run_until(lambda: group.state.applied_index == group.raft.last_index())
    last = group.raft.log.entry(group.state.applied_index)
    assert last.data is None  # the new term's empty entry is the last one applied
    leader.snapshot_group(group)
    assert group.snapshot_index == group.state.applied_index
    c.crash(leader.node_id)
    c.start(leader.node_id)  # raised CorruptData: "storage at index 4, behind its snapshot at 5"
    restarted = c.hosts[leader.node_id].groups[GROUP]
    assert restarted.state.applied_index >= group.snapshot_index
    c.start(old.node_id)
    c.commit(99, "after", "x")
    c.run_until(lambda: all(c.value(n, "k2") == 2 and c.value(n, "after") == "x" for n in (1, 2, 3)))


def test_a_restarted_replica_declines_to_snapshot_until_raft_has_applied_its_state_again(tmp_path):
    # A stored shard restarts at its storage's applied index, ahead of what Raft has handed
    # out again (none of its log yet). A snapshot then (an ADD_LEARNER takes one, and the
    # replica may lead by then) must wait rather than ask Raft to compact entries it has
    # not applied, which raised RaftInvariantError.
    c = Cluster(tmp_path, stored=True)
    for i in range(5):
        c.commit(i + 1, f"k{i}", i)
    c.run_until(lambda: c.value(3, "k4") == 4)
    c.hosts[3].groups[GROUP].state.make_durable()
    c.crash(3)
    c.start(3)
    group = c.hosts[3].groups[GROUP]
    assert group.raft.applied_index < group.state.applied_index  # the window
    assert c.hosts[3].snapshot_group(group) is False
    c.run_until(lambda: group.raft.applied_index >= group.state.applied_index)
    assert c.hosts[3].snapshot_group(group) is True
    assert group.snapshot_index == group.state.applied_index


def test_the_sweep_settles_a_prepare_at_once_when_its_connection_closed(tmp_path):
    # A prepare waits ``after`` seconds for its decision before the leader settles it with
    # the coordinator shard; one whose client connection closed (an orphan) goes now.
    c = Cluster(tmp_path)
    c.run_until(lambda: c.leader() is not None)
    leader, done = c.leader(), []
    prepare = CommitRequest(7, 1, {}, (WriteOp("k", OpKind.PUT, "v"),))
    leader.propose(GROUP, PREPARE, [prepare.to_wire(), 5, [GROUP, 5]], lambda r, e: done.append(r))
    c.run_until(lambda: bool(done))
    prepared = leader.groups[GROUP].state.prepared[7]
    now = prepared.since + 0.1
    assert sweep(leader.groups, FinishTracker(), now, 2.0, settling=()).settle == []
    work = sweep(leader.groups, FinishTracker(), now, 2.0, settling=(), orphans={(GROUP, 7)})
    assert [(gid, txid, p.coordinator_shard) for gid, txid, p in work.settle] == [(GROUP, 7, 5)]
    # Not twice: a settling under way is left alone; nor on a follower, which does not settle.
    assert sweep(leader.groups, FinishTracker(), now, 2.0, settling={(GROUP, 7)}, orphans={(GROUP, 7)}).settle == []
    follower = next(h for h in c.hosts.values() if h is not leader)
    assert sweep(follower.groups, FinishTracker(), now, 2.0, settling=(), orphans={(GROUP, 7)}).settle == []
    # What a closed connection settles at once, without a whole sweep: the same choice.
    assert [(g, t) for g, t, _ in orphans_to_settle(leader.groups, [(GROUP, 7), (GROUP, 8)], ())] == [(GROUP, 7)]
    assert orphans_to_settle(leader.groups, [(GROUP, 7)], {(GROUP, 7)}) == []
    assert orphans_to_settle(follower.groups, [(GROUP, 7)], ()) == []
