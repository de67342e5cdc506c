"""Quiescence: an idle group stops its timers and heartbeats; anything that needs it wakes it."""

from __future__ import annotations

from pykv.raft import MsgType, RaftConfig, Role
from pykv.raft.harness import Harness

QUIET = RaftConfig(election_ticks=10, heartbeat_ticks=2, quiesce_ticks=5)


def quiesced_group(seed: int = 0) -> Harness:
    h = Harness([1, 2, 3], config=QUIET, seed=seed)
    h.elect(1)
    h.nodes[1].propose(b"x")
    h.settle()
    h.tick(n=QUIET.quiesce_ticks + 1)
    return h


def sent_on_tick(h: Harness) -> list:
    """Tick every node once and return the messages that produced (without delivering)."""
    for i in h.ids:
        if i not in h.down:
            h.nodes[i].tick()
    h.flush()
    sent = list(h.in_flight)
    h.settle()
    return sent


def test_an_idle_group_quiesces_and_then_sends_nothing_at_all():
    h = quiesced_group()
    assert all(h.nodes[i].quiesced for i in (1, 2, 3))
    assert h.nodes[1].is_leader()
    for _ in range(10 * QUIET.election_ticks):  # long past any election timeout
        assert sent_on_tick(h) == []
    assert h.nodes[1].is_leader() and h.nodes[2].role == Role.FOLLOWER
    assert {h.nodes[i].term for i in (1, 2, 3)} == {h.nodes[1].term}


def test_a_live_follower_still_catching_up_keeps_the_group_awake():
    h = Harness([1, 2, 3], config=QUIET)
    h.elect(1)
    h.filter = lambda m: not (m.type == MsgType.APP and m.to == 3)  # it hears only beats
    h.nodes[1].propose(b"x")
    h.settle()
    h.tick(n=5 * QUIET.quiesce_ticks)
    assert not h.nodes[1].quiesced


def test_a_dead_follower_does_not_keep_the_group_awake_and_catches_up_when_back():
    h = Harness([1, 2, 3], config=QUIET)
    h.elect(1)
    h.crash(3)
    h.nodes[1].propose(b"x")
    h.settle()
    h.tick(n=QUIET.election_ticks + QUIET.quiesce_ticks + 1)  # check-quorum marks 3 inactive
    assert h.nodes[1].quiesced and h.nodes[2].quiesced
    h.restart(3)
    # Node 3 hears nothing and campaigns; its pre-vote wakes the leader, whose beat shows it
    # the missing entry.
    h.tick(n=3 * QUIET.election_ticks)
    assert h.applied_data(3) == [b"x"] and h.nodes[1].is_leader()


def test_a_proposal_wakes_the_group_and_commits_on_every_member():
    h = quiesced_group()
    h.nodes[1].propose(b"after")
    h.settle()
    assert not h.nodes[1].quiesced and not h.nodes[2].quiesced
    assert h.applied_data(1)[-1] == b"after"
    h.tick(n=QUIET.heartbeat_ticks)  # the followers learn the commit index from a beat
    for i in (1, 2, 3):
        assert h.applied_data(i)[-1] == b"after"
    h.tick(n=QUIET.quiesce_ticks + 1)
    assert all(h.nodes[i].quiesced for i in (1, 2, 3))  # idle again: quiet again


def test_a_read_on_a_quiesced_leader_confirms_leadership_with_a_fresh_round():
    h = Harness([1, 2, 3], config=RaftConfig(
        election_ticks=10, heartbeat_ticks=2, quiesce_ticks=5, read_only="lease",
    ))
    for _ in range(100):  # lease mode: nodes start quiet for an election timeout
        h.tick()
        if h.leader() is not None and h.leader().quiesced:
            break
    leader = h.leader()
    assert leader is not None and leader.quiesced
    # The lease it held before quiescing is forgotten: serving from it would trust acks of
    # unknown age, so the read needs a heartbeat round with a quorum.
    h.isolate(leader.id)
    leader.read_index("r1")
    h.settle()
    assert h.read_states[leader.id] == []
    h.heal()
    leader.read_index("r2")  # its round confirms r1 too, which arrived before it
    h.settle()
    assert [rs.context for rs in h.read_states[leader.id]] == ["r1", "r2"]


def test_a_follower_that_missed_quiesce_wakes_the_leader_by_campaigning():
    h = Harness([1, 2, 3], config=QUIET)
    h.elect(1)
    h.filter = lambda m: not (m.type == MsgType.QUIESCE and m.to == 3)
    h.tick(n=QUIET.quiesce_ticks + 1)
    assert h.nodes[1].quiesced and h.nodes[2].quiesced and not h.nodes[3].quiesced
    h.filter = None
    # Node 3 times out; its pre-vote wakes the leader, which beats again, and node 3 follows
    # it. No new term: the pre-vote was refused and the leader never lost the group.
    term = h.nodes[1].term
    h.tick(3, n=2 * QUIET.election_ticks)
    assert h.nodes[1].is_leader() and h.nodes[1].term == term
    assert h.nodes[3].leader_id == 1


def test_a_woken_follower_of_a_dead_leader_elects_a_new_one():
    h = quiesced_group()
    h.crash(1)
    for _ in range(10 * QUIET.election_ticks):
        assert sent_on_tick(h) == []  # nobody times out by itself while quiesced
    # The driver saw the leader's node silent for an election timeout: it wakes both.
    for i in (2, 3):
        h.nodes[i].wake(silent_ticks=QUIET.election_ticks)
    for _ in range(3 * QUIET.election_ticks):
        h.tick()
        if h.leader() is not None:
            break
    new = h.leader()
    assert new is not None and new.id in (2, 3) and new.term > 2
    new.propose(b"later")
    h.settle()
    h.tick(n=QUIET.heartbeat_ticks)
    assert h.applied_data(2)[-1] == b"later" and h.applied_data(3)[-1] == b"later"


def test_a_quiesced_leader_cut_off_from_its_followers_steps_down_once_woken():
    h = quiesced_group()
    h.isolate(1)
    h.nodes[1].propose(b"lost")  # wakes it; nobody acknowledges
    h.tick(1, n=2 * QUIET.election_ticks + 1)
    assert h.nodes[1].role == Role.FOLLOWER  # check-quorum, from the moment it woke


def test_a_member_whose_acks_were_lost_commits_everything_when_the_group_quiesces():
    """The leader bounds a message's commit index by what it knows a member holds, and a
    member whose acks were lost looks behind. Found by the simulator (seed 200810, "crash"):
    such a member quiesced with its last entries in its log but not applied, and stayed
    behind for as long as the group was idle. A QUIESCE that matches its log commits it all."""
    h = Harness([1, 2, 3], config=QUIET)
    h.elect(1)
    h.filter = lambda m: not (m.frm == 3 and m.to == 1)  # 3 hears the leader; its acks are lost
    h.nodes[1].propose(b"x")
    h.settle()
    h.tick(n=QUIET.election_ticks + QUIET.quiesce_ticks + 1)  # check-quorum marks 3 inactive
    assert h.nodes[1].quiesced and h.nodes[3].quiesced
    assert h.applied_data(3) == [b"x"]
