"""ConsensusModule: a real in-process Raft group with threads, timers and faults."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from pykv.raft import ConsensusModule
from pykv.raft.consensus import UnknownNode


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def propose_from_threads(group, threads: int, per_thread: int, prefix: str) -> list[bool]:
    results: list[bool] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        for i in range(per_thread):
            ok = group.propose(f"{prefix}-{t}-{i}", timeout=10.0)
            with lock:
                results.append(ok)

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return results


def assert_replicas_converge(group, nodes):
    expected = group.get_committed_transactions()
    assert wait_for(lambda: all(
        group.get_committed_transactions(node=n) == expected for n in nodes
    )), "replicas did not converge on the committed log"
    assert group.safety_violations == []


@pytest.mark.parametrize("nodes", [3, 5])
def test_proposals_from_many_threads_commit_exactly_once_in_one_order(nodes):
    with ConsensusModule.in_memory(nodes=nodes, seed=nodes) as group:
        results = propose_from_threads(group, threads=8, per_thread=15, prefix="p")
        assert all(results)
        committed = group.get_committed_transactions()
        counts = Counter(committed)
        assert len(committed) == 8 * 15 and set(counts.values()) == {1}
        # Each thread's own commands commit in the order it proposed them.
        for t in range(8):
            mine = [c for c in committed if c.startswith(f"p-{t}-")]
            assert mine == [f"p-{t}-{i}" for i in range(15)]
        assert_replicas_converge(group, range(nodes))


@pytest.mark.parametrize("nodes", [3, 5])
def test_a_new_leader_takes_over_when_the_leader_crashes(nodes):
    with ConsensusModule.in_memory(nodes=nodes, seed=10 + nodes) as group:
        assert group.propose("before")
        old = group.leader()
        group.crash(old)
        results = propose_from_threads(group, threads=4, per_thread=5, prefix="after")
        assert all(results)
        assert group.leader() not in (None, old)
        group.restart(old)
        assert group.propose("after-restart")
        committed = group.get_committed_transactions()
        assert committed[0] == "before" and committed[-1] == "after-restart"
        assert len(committed) == len(set(committed)) == 22
        assert_replicas_converge(group, range(nodes))


@pytest.mark.parametrize("nodes", [3, 5])
def test_the_majority_continues_and_the_minority_cannot_commit(nodes):
    with ConsensusModule.in_memory(nodes=nodes, seed=20 + nodes) as group:
        assert group.propose("start")
        leader = group.leader()
        minority_size = (nodes - 1) // 2
        others = [n for n in range(nodes) if n != leader]
        minority = [leader, *others[: minority_size - 1]]
        majority = [n for n in range(nodes) if n not in minority]
        group.partition([minority, majority])
        # The old leader is cut off with a minority: whatever it takes never commits.
        assert not group.propose("minority", timeout=1.0, node=leader)
        results = propose_from_threads(group, threads=3, per_thread=4, prefix="majority")
        assert all(results)
        assert group.leader() in majority
        group.partition([])
        assert group.propose("healed")
        committed = group.get_committed_transactions()
        assert "minority" not in committed and committed[-1] == "healed"
        assert_replicas_converge(group, range(nodes))
        assert "minority" not in group.get_committed_transactions(node=leader)


def test_an_isolated_node_rejoins_and_catches_up():
    with ConsensusModule.in_memory(nodes=3, seed=1) as group:
        assert group.propose("a")
        follower = next(n for n in range(3) if n != group.leader())
        group.partition([[n for n in range(3) if n != follower]])
        for i in range(10):
            assert group.propose(f"b{i}")
        group.partition([])
        assert_replicas_converge(group, range(3))


def test_unknown_nodes_are_refused():
    with ConsensusModule.in_memory(nodes=3) as group:
        with pytest.raises(UnknownNode):
            group.crash(7)
        with pytest.raises(UnknownNode):
            group.partition([[0, 9]])


def test_random_crashes_and_partitions_lose_no_acknowledged_proposal():
    import random

    rng = random.Random(7)
    with ConsensusModule.in_memory(nodes=5, seed=7) as group:
        acknowledged: list[str] = []
        lock = threading.Lock()
        stop = threading.Event()

        def worker(t: int) -> None:
            i = 0
            while not stop.is_set():
                cmd = f"w{t}-{i}"
                i += 1
                if group.propose(cmd, timeout=1.0):
                    with lock:
                        acknowledged.append(cmd)

        workers = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for w in workers:
            w.start()
        down: set[int] = set()
        for _ in range(12):
            action = rng.random()
            if action < 0.4 and len(down) < 2:
                victim = rng.randrange(5)
                group.crash(victim)
                down.add(victim)
            elif action < 0.7 and down:
                back = down.pop()
                group.restart(back)
            else:
                ids = list(range(5))
                rng.shuffle(ids)
                group.partition([ids[:2], ids[2:]])
            time.sleep(0.25)
            group.partition([])
        for n in down:
            group.restart(n)
        stop.set()
        for w in workers:
            w.join()
        assert group.propose("final", timeout=10.0)
        committed = group.get_committed_transactions()
        assert len(committed) == len(set(committed))
        assert set(acknowledged) <= set(committed)
        assert len(acknowledged) > 10
        assert_replicas_converge(group, range(5))
