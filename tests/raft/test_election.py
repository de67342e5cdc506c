"""Leader election (Raft §5.2, §5.4.1), pre-vote (thesis §9.6) and check-quorum (§6.2)."""

from __future__ import annotations

import random

import pytest

from pykv.raft import (
    ConfChange,
    ConfChangeKind,
    Message,
    MsgType,
    RaftConfig,
    RaftNode,
    Role,
    bootstrap_state,
)
from pykv.raft.harness import Harness


def lone(node_id: int = 1, voters=(1, 2, 3), **cfg) -> RaftNode:
    return RaftNode(node_id, state=bootstrap_state(voters), config=RaftConfig(**cfg),
                    rng=random.Random(node_id))


def drain(node: RaftNode):
    rd = node.ready()
    node.advance(rd)
    return rd


def test_a_follower_that_hears_nothing_campaigns_with_a_vote_for_itself_persisted_first():
    node = lone(pre_vote=False)
    for _ in range(node.randomized_timeout):
        node.tick()
    assert node.role == Role.CANDIDATE and node.term == 2 and node.vote == 1
    rd = drain(node)
    # The vote for itself and the new term are in the same Ready as the vote requests, so the
    # driver persists them before any request leaves.
    assert rd.hard_state.term == 2 and rd.hard_state.vote == 1
    assert sorted(m.to for m in rd.messages if m.type == MsgType.VOTE) == [2, 3]


def test_randomized_timeouts_lie_between_one_and_two_election_timeouts():
    timeouts = {lone(i).randomized_timeout for i in range(1, 60)}
    assert min(timeouts) >= 10 and max(timeouts) < 20 and len(timeouts) > 3


def test_three_nodes_elect_exactly_one_leader_and_all_agree():
    h = Harness([1, 2, 3], config=RaftConfig(pre_vote=False))
    h.elect(1)
    assert h.nodes[1].role == Role.LEADER
    assert all(h.nodes[i].leader_id == 1 for i in (1, 2, 3))
    assert {h.nodes[i].term for i in (1, 2, 3)} == {2}


def test_a_vote_is_granted_at_most_once_per_term():
    node = lone(1, pre_vote=False, check_quorum=False)
    node.step(Message(MsgType.VOTE, 1, 2, term=5, index=1, log_term=1))
    node.step(Message(MsgType.VOTE, 1, 3, term=5, index=1, log_term=1))
    rd = drain(node)
    answers = {m.to: m.reject for m in rd.messages if m.type == MsgType.VOTE_RESP}
    assert answers == {2: False, 3: True}
    assert rd.hard_state.vote == 2 and rd.hard_state.term == 5
    # Asking again for the same candidate is idempotent (a duplicated request).
    node.step(Message(MsgType.VOTE, 1, 2, term=5, index=1, log_term=1))
    assert [m.reject for m in drain(node).messages] == [False]


def test_a_candidate_with_an_older_log_is_refused():
    h = Harness([1, 2, 3], config=RaftConfig(pre_vote=False, check_quorum=False))
    h.elect(1)
    h.nodes[1].propose(b"x")
    h.settle()
    voter = h.nodes[2]
    # Candidate 3 pretends its log ends at index 1 (term 1): behind the voter's (3, term 2).
    voter.step(Message(MsgType.VOTE, 2, 3, term=9, index=1, log_term=1))
    rd = drain(voter)
    assert [m.reject for m in rd.messages if m.type == MsgType.VOTE_RESP] == [True]
    assert voter.term == 9 and voter.vote is None
    # Same last term but a longer log is up to date; a higher last term wins regardless of length.
    voter.step(Message(MsgType.VOTE, 2, 3, term=10, index=2, log_term=2))
    assert drain(voter).messages[0].reject
    voter.step(Message(MsgType.VOTE, 2, 3, term=11, index=1, log_term=3))
    assert not drain(voter).messages[0].reject


def test_a_higher_term_in_any_message_turns_a_leader_into_a_follower():
    h = Harness([1, 2, 3], config=RaftConfig(check_quorum=False))
    leader = h.elect(1)
    leader.step(Message(MsgType.APP_RESP, 1, 3, term=leader.term + 3, index=0))
    assert leader.role == Role.FOLLOWER and leader.term == 5 and leader.vote is None


def test_stale_term_messages_are_ignored():
    h = Harness([1, 2, 3])
    h.elect(1)
    follower = h.nodes[2]
    before = follower.log.last_index()
    follower.step(Message(MsgType.APP, 2, 3, term=1, index=2, log_term=2, entries=()))
    rd = drain(follower)
    assert follower.log.last_index() == before and follower.leader_id == 1
    # It answers with its term so a stale leader learns it is deposed.
    assert [(m.type, m.term) for m in rd.messages] == [(MsgType.APP_RESP, 2)]


def test_split_vote_resolves_into_a_single_leader_by_randomized_timeouts():
    h = Harness([1, 2, 3, 4, 5], config=RaftConfig(pre_vote=False), seed=7)
    for _ in range(60):
        h.tick()
        leaders = [n for n in h.nodes.values() if n.is_leader()]
        if leaders:
            break
    by_term = {}
    for n in h.nodes.values():
        if n.is_leader():
            by_term.setdefault(n.term, []).append(n.id)
    assert by_term and all(len(v) == 1 for v in by_term.values())


def test_pre_vote_keeps_an_isolated_node_from_inflating_its_term():
    h = Harness([1, 2, 3], config=RaftConfig(pre_vote=True))
    h.elect(1)
    term = h.nodes[1].term
    h.isolate(3)
    for _ in range(100):
        h.nodes[3].tick()
        h.settle()
    assert h.nodes[3].term == term and h.nodes[3].role == Role.PRE_CANDIDATE
    h.heal()
    h.tick(n=3)
    # Rejoining disturbs nobody: same leader, same term.
    assert h.nodes[1].is_leader() and h.nodes[1].term == term and h.nodes[3].leader_id == 1


def test_without_pre_vote_a_rejoining_node_disrupts_the_term():
    h = Harness([1, 2, 3], config=RaftConfig(pre_vote=False, check_quorum=False))
    h.elect(1)
    h.isolate(3)
    for _ in range(50):
        h.nodes[3].tick()
        h.settle()
    assert h.nodes[3].term > h.nodes[1].term  # the problem pre-vote exists to solve


def test_check_quorum_steps_down_a_leader_that_cannot_hear_a_majority():
    h = Harness([1, 2, 3], config=RaftConfig(check_quorum=True))
    leader = h.elect(1)
    h.isolate(1)
    for _ in range(2 * leader.cfg.election_ticks):
        leader.tick()
        h.settle()
    assert leader.role == Role.FOLLOWER


def test_check_quorum_lease_makes_followers_ignore_vote_requests_while_the_leader_is_alive():
    h = Harness([1, 2, 3], config=RaftConfig(check_quorum=True, pre_vote=False))
    h.elect(1)
    follower = h.nodes[2]
    follower.step(Message(MsgType.VOTE, 2, 3, term=9, index=99, log_term=9))
    rd = drain(follower)
    assert follower.term == 2 and not rd.messages


def test_a_learner_never_campaigns():
    h = Harness([1, 2, 3])
    h.elect(1)
    h.add_empty(4)
    h.nodes[1].propose_conf_change(ConfChange.single(ConfChangeKind.ADD_LEARNER, 4))
    h.settle()
    learner = h.nodes[4]
    assert 4 in learner.conf.learners
    h.isolate(4)
    for _ in range(100):
        learner.tick()
    assert learner.role == Role.FOLLOWER


@pytest.mark.parametrize("pre_vote", [True, False])
def test_single_voter_group_elects_itself_and_commits_alone(pre_vote):
    h = Harness([1], config=RaftConfig(pre_vote=pre_vote))
    node = h.elect(1)
    assert node.is_leader()
    node.propose(b"a")
    h.settle()
    assert h.applied_data(1) == [b"a"]
