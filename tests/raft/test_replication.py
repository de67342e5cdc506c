"""Log replication (§5.3): batching, pipelining, fast back-off, commit rules, Figure 8."""

from __future__ import annotations

import copy
import random

import pytest

from pykv.raft import (
    Entry,
    HardState,
    Message,
    MsgType,
    NotLeader,
    PersistentState,
    RaftConfig,
    RaftNode,
    RaftUsageError,
    Role,
    bootstrap_state,
)
from pykv.raft.harness import Harness
from pykv.raft.progress import ProgressState


def drain(node: RaftNode):
    rd = node.ready()
    node.advance(rd)
    return rd


def test_proposals_commit_and_apply_in_the_same_order_everywhere():
    h = Harness([1, 2, 3])
    leader = h.elect(1)
    for i in range(20):
        leader.propose(f"cmd{i}".encode())
        if i % 3 == 0:
            h.settle()
    h.settle()
    h.tick(n=2)
    expected = [f"cmd{i}".encode() for i in range(20)]
    assert all(h.applied_data(i) == expected for i in (1, 2, 3))


def test_a_follower_rejects_proposals_with_a_leader_hint():
    h = Harness([1, 2, 3])
    h.elect(2)
    with pytest.raises(NotLeader) as info:
        h.nodes[3].propose(b"x")
    assert info.value.leader_hint == 2


def test_proposals_made_before_one_ready_travel_in_one_append_per_follower():
    h = Harness([1, 2, 3])
    leader = h.elect(1)
    for i in range(10):
        leader.propose(bytes([i]))
    rd = drain(leader)
    apps = [m for m in rd.messages if m.type == MsgType.APP]
    assert sorted(m.to for m in apps) == [2, 3]
    assert all(len(m.entries) == 10 for m in apps)


def test_appends_are_pipelined_up_to_the_inflight_limit_without_waiting_for_acks():
    h = Harness([1, 2, 3], config=RaftConfig(max_inflight=3, max_batch_entries=1))
    leader = h.elect(1)
    assert leader.progress(2).state == ProgressState.REPLICATE
    for i in range(10):
        leader.propose(bytes([i]))
    rd = drain(leader)
    to2 = [m for m in rd.messages if m.to == 2 and m.type == MsgType.APP]
    # Three single-entry appends in flight at once, then the window is full.
    assert [m.entries[0].index for m in to2] == [3, 4, 5]
    assert leader.progress(2).is_paused()


def test_the_leader_does_not_count_itself_until_its_entries_are_durable():
    h = Harness([1, 2, 3])
    leader = h.elect(1)
    _, index = leader.propose(b"x")
    rd = leader.ready()  # not yet advanced: the leader's copy is not durable
    h.disks[1].write(rd)
    for m in rd.messages:
        if m.to == 2:
            h.nodes[2].step(m)
    for m in drain(h.nodes[2]).messages:
        leader.step(m)
    # Follower 2 + leader would be a majority, but the leader has not reported its fsync.
    assert leader.commit_index < index
    leader.advance(rd)
    assert leader.commit_index == index


def test_a_follower_answers_an_append_only_in_the_ready_that_persists_the_entries():
    h = Harness([1, 2, 3])
    leader = h.elect(1)
    leader.propose(b"x")
    app = next(m for m in drain(leader).messages if m.to == 2)
    follower = h.nodes[2]
    follower.step(app)
    rd = follower.ready()
    assert [e.data for e in rd.entries] == [b"x"]
    assert any(m.type == MsgType.APP_RESP and not m.reject for m in rd.messages)
    # A crash before the Ready is persisted loses both the entry and the acknowledgement.
    h.crash(2)
    restarted = h.restart(2)
    assert restarted.log.last_index() == app.index


def test_fast_backoff_skips_a_whole_divergent_term_per_round_trip():
    # Follower 2 holds 50 entries of an old term 2 that leader 1 (term 4) never had.
    cfg = RaftConfig(check_quorum=False, pre_vote=False)
    boot = bootstrap_state([1, 2, 3])
    stale = tuple(Entry(2, i, data=b"old") for i in range(2, 52))
    good = tuple(Entry(3, i, data=b"new") for i in range(2, 6))
    follower = RaftNode(2, state=PersistentState(HardState(3, None, 1), boot.entries + stale),
                        config=cfg, rng=random.Random(2))
    leader = RaftNode(1, state=PersistentState(HardState(3, None, 1), boot.entries + good),
                      config=cfg, rng=random.Random(1))
    for _ in range(leader.randomized_timeout):
        leader.tick()
    votes = [m for m in drain(leader).messages if m.type == MsgType.VOTE]
    leader.step(Message(MsgType.VOTE_RESP, 1, 3, term=votes[0].term))
    assert leader.role == Role.LEADER
    round_trips = 0
    pending = list(drain(leader).messages)
    while pending:
        to_follower = [m for m in pending if m.to == 2]
        pending = []
        for m in to_follower:
            follower.step(m)
            round_trips += m.type == MsgType.APP
        for m in drain(follower).messages:
            leader.step(m)
        pending = list(drain(leader).messages)
        if not any(m.to == 2 for m in pending):
            break
    assert follower.log.term(follower.log.last_index()) == leader.term
    assert [e.data for e in follower.log.entries_from(follower.log.first_index())[1:5]] == [b"new"] * 4
    assert round_trips <= 4  # not one per stale entry


def test_figure8_an_old_term_entry_is_not_committed_by_counting_replicas():
    """Raft paper Figure 8: S1 (term 4) must not commit its term-2 entry on a majority."""
    cfg = RaftConfig(check_quorum=False, pre_vote=False)
    h = Harness([1, 2, 3, 4, 5], config=cfg)
    # (a) S1 leads term 2; its entry at index 3 (term 2) reaches S2 only.
    s1 = h.elect(1)
    assert s1.term == 2
    _, idx = s1.propose(b"term2-entry")
    h.filter = lambda m: not (m.frm == 1 and m.type == MsgType.APP and m.to != 2)
    h.settle()
    h.filter = None
    assert h.nodes[2].log.term(idx) == 2 and h.nodes[3].log.term(idx) is None
    # (b) S1 crashes; S5 wins term 3 with S3, S4 and appends at index 3 (term 3) alone.
    h.crash(1)
    s5 = h.nodes[5]
    h.filter = lambda m: m.type not in (MsgType.APP, MsgType.HEARTBEAT) or m.frm != 5
    h.elect(5)
    assert s5.is_leader() and s5.term == 3 and s5.log.term(idx) == 3
    # (c) S5 crashes; S1 restarts, wins term 4 (S2, S3 vote) and copies index 3 (term 2) to S3.
    h.crash(5)
    h.filter = None
    h.restart(1)
    s1 = h.nodes[1]
    h.filter = lambda m: not (m.frm == 1 and m.type in (MsgType.APP, MsgType.HEARTBEAT))
    h.elect(1)
    assert s1.is_leader() and s1.term == 4
    entry3 = s1.log.entry(idx)
    for peer in (2, 3):
        h.nodes[peer].step(Message(MsgType.APP, peer, 1, term=4, index=idx - 1, log_term=2,
                                   entries=(entry3,), commit=s1.commit_index))
        for m in drain(h.nodes[peer]).messages:
            s1.step(m)
    drain(s1)
    # Index 3 (term 2) is on S1, S2, S3, a majority, yet it must not count as committed.
    assert all(h.nodes[i].log.term(idx) == 2 for i in (1, 2, 3))
    assert s1.commit_index < idx
    # (d) S1 crashes; S5 comes back, wins term 5 and overwrites index 3 everywhere.
    h.crash(1)
    h.filter = None
    h.restart(5)
    h.elect(5)
    h.tick(n=3)
    assert h.nodes[5].is_leader()
    for i in (2, 3, 4, 5):
        assert h.nodes[i].log.term(idx) == 3
        assert b"term2-entry" not in h.applied_data(i)


def test_figure8_once_the_current_term_entry_commits_the_old_one_commits_with_it():
    cfg = RaftConfig(check_quorum=False, pre_vote=False)
    h = Harness([1, 2, 3, 4, 5], config=cfg)
    s1 = h.elect(1)
    s1.propose(b"term2-entry")
    h.filter = lambda m: not (m.frm == 1 and m.type == MsgType.APP and m.to != 2)
    h.settle()
    h.crash(1)
    h.restart(1)
    h.filter = None
    s1 = h.nodes[1]
    h.elect(1)  # term 3, noop at index 4 replicated with index 3 to everyone
    h.settle()
    assert s1.commit_index >= 4
    h.crash(1)
    h.elect(5)
    h.tick(n=3)
    # Committed means committed: S5 could not win with a shorter log, and nobody lost index 3.
    assert h.leader() is not None
    for i in (2, 3, 4, 5):
        assert b"term2-entry" in h.applied_data(i)


def test_conflicting_uncommitted_entries_are_truncated_and_replaced():
    cfg = RaftConfig(check_quorum=False, pre_vote=False)
    h = Harness([1, 2, 3], config=cfg)
    h.elect(1)
    h.isolate(1)
    for i in range(5):
        h.nodes[1].propose(f"lost{i}".encode())
    h.settle()
    h.elect(2)
    h.nodes[2].propose(b"kept")
    h.settle()
    h.heal()
    h.tick(n=3)
    for i in (1, 2, 3):
        assert h.applied_data(i) == [b"kept"]
        assert all(e.data != b"lost0" for e in h.nodes[i].log.entries_from(1))


def test_the_ready_contract_is_enforced():
    h = Harness([1, 2, 3])
    leader = h.elect(1)
    leader.propose(b"x")
    rd = leader.ready()
    with pytest.raises(RaftUsageError):
        leader.ready()
    with pytest.raises(RaftUsageError):
        leader.advance(type(rd)(**{f: getattr(rd, f) for f in rd.__dataclass_fields__}))
    leader.advance(rd)
    assert not leader.has_ready() or leader.ready() is not None


def test_a_restart_recovers_term_vote_log_and_commit_from_durable_state():
    h = Harness([1, 2, 3])
    leader = h.elect(1)
    for i in range(5):
        leader.propose(bytes([i]))
    h.settle()
    h.tick(n=2)
    h.crash(2)
    node = h.restart(2)
    assert node.term == leader.term and node.log.last_index() == leader.log.last_index()
    assert node.role == Role.FOLLOWER and node.commit_index >= 2
    h.tick(n=2)
    assert h.applied_data(2) == [bytes([i]) for i in range(5)]


def test_a_follower_restored_from_an_older_copy_is_reported_and_caught_up():
    """Node 3's durable state is put back to an older copy after it acknowledged more. Its
    leader finds it refusing what follows an entry it acknowledged, twice (once could be a
    refusal delivered after the ack): it reports the follower (lost_acks), forgets its
    match, and catches it up. Before, the leader kept sending the
    entries after the acknowledged one, one more append per heartbeat, and the group never
    settled."""
    h = Harness([1, 2, 3])
    leader = h.elect(1)
    for i in range(5):
        leader.propose(f"a{i}".encode())
    h.settle()
    older = copy.deepcopy(h.disks[3])
    for i in range(5):
        leader.propose(f"b{i}".encode())
    h.settle()
    acknowledged = leader.prs[3].match
    h.crash(3)
    h.disks[3] = older
    h.restart(3)
    for i in range(3):
        leader.propose(f"c{i}".encode())
    h.settle()
    h.tick(n=5)
    assert [(f, a) for f, a, _ in leader.lost_acks] == [(3, acknowledged)]
    assert leader.lost_acks[0][2] < acknowledged
    assert h.nodes[3].log.last_index() == leader.log.last_index() == leader.prs[3].match
    assert h.applied_data(3)[-3:] == [b"c0", b"c1", b"c2"]
