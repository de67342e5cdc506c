"""Faults on a real 3-node cluster under load: SIGKILL and SIGSTOP of a shard leader, restart.

The load and the checks are tests/fault_load.py's: linearizable per-key histories, a
strictly serializable list-append history, and multi-shard increments that stay atomic and
count every acknowledged transaction. The killed node restarts with `cluster up` and
catches up. The longest pause clients saw is printed (measured, not asserted).
"""

from __future__ import annotations

import random
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster_harness import local_cluster  # noqa: E402
from fault_load import check_history, run_with_fault, wait_caught_up  # noqa: E402

import pykv.client  # noqa: E402


@pytest.mark.slow
def test_sigkill_of_a_shard_leader_loses_no_acknowledged_commit(tmp_path):
    with local_cluster(tmp_path, nodes=3, partitions=8) as cluster:
        victim = cluster.leader_of(0)
        assert victim is not None
        load, pause = run_with_fault(cluster, lambda: cluster.kill(victim))
        print(f"\nSIGKILL of node {victim} (leader of shard 0): longest pause of one client "
              f"{pause[0]:.3f}s ({pause[1]})")
        check_history(load)
        assert victim not in cluster.alive()
        cluster.up()  # `pykv cluster up` again restarts only the killed node
        assert victim in cluster.alive()
        wait_caught_up(cluster, victim)


@pytest.mark.slow
def test_sigstop_of_a_shard_leader_causes_no_split_brain(tmp_path):
    # Shard values in memory here (the other tests use the default, on-disk storage).
    with local_cluster(tmp_path, nodes=3, partitions=8, state="memory") as cluster:
        victim = cluster.leader_of(0)
        assert victim is not None

        def stop_then_continue() -> None:
            cluster.signal(victim, signal.SIGSTOP)
            time.sleep(1.5)  # long past the election timeout: the others elect new leaders
            cluster.signal(victim, signal.SIGCONT)  # the old leader wakes believing it leads

        load, pause = run_with_fault(cluster, stop_then_continue)
        print(f"\nSIGSTOP of node {victim} for 1.5s: longest pause of one client "
              f"{pause[0]:.3f}s ({pause[1]})")
        check_history(load)
        wait_caught_up(cluster, victim)


@pytest.mark.slow
def test_a_frozen_leader_costs_a_client_one_attempt_timeout(tmp_path):
    """A SIGSTOPped leader keeps its connections open and answers nothing. Once one attempt
    on it has timed out, the client must not go back to it because a follower, not yet past
    its election timeout, still names it in a redirect: that would stall the client another
    whole attempt timeout, again and again until the election."""
    with local_cluster(tmp_path, nodes=3, partitions=4, state="memory") as cluster:
        db = pykv.client.connect(cluster.addresses, timeout=15)
        try:
            key = "frozen"
            db.put(key, "before")  # the client now knows the shard's leader
            victim = cluster.leader_of(db.backend.core.shard_of(key))
            assert victim is not None
            router = db.backend.core.router
            # Shorter than any election timeout (400 ms or more), so the followers still name
            # the frozen leader when the client turns to them; and passed over long enough for
            # them to elect another.
            router.attempt_timeout, router.suspect_for = 0.2, 10.0
            cluster.signal(victim, signal.SIGSTOP)
            try:
                db.put(key, "while frozen")
            finally:
                cluster.signal(victim, signal.SIGCONT)
            assert router.timeouts[victim] == 1
            assert db.get(key) == "while frozen"
        finally:
            db.close()


@pytest.mark.slow
def test_repeated_kills_and_pauses_of_random_nodes_lose_nothing(tmp_path):
    """Faults one after another on random nodes, sometimes two at once (then no shard has a
    quorum for a while): SIGKILL and a restart with `cluster up`, or SIGSTOP and SIGCONT.
    The history stays linearizable and strictly serializable, the multi-shard increments
    atomic, and every node catches up. The schedule comes from a seed, printed."""
    seed = random.randrange(1 << 16)
    rng = random.Random(seed)
    print(f"\nfault schedule seed {seed}")
    with local_cluster(tmp_path, nodes=3, partitions=8) as cluster:

        def faults() -> None:
            for _ in range(8):
                victims = rng.sample(sorted(cluster.config.nodes), 2 if rng.random() < 0.3 else 1)
                kinds = [rng.choice(["kill", "stop"]) for _ in victims]
                for kind, victim in zip(kinds, victims, strict=True):
                    if kind == "kill":
                        cluster.kill(victim)
                    else:
                        cluster.signal(victim, signal.SIGSTOP)
                time.sleep(rng.uniform(0.3, 2.0))
                for kind, victim in zip(kinds, victims, strict=True):
                    if kind == "stop":
                        cluster.signal(victim, signal.SIGCONT)
                if "kill" in kinds:
                    cluster.up()  # restarts only the killed nodes
                print(f"  {' and '.join(kinds)} of node(s) {victims}")
                time.sleep(rng.uniform(0.5, 1.5))

        load, pause = run_with_fault(cluster, faults)
        print(f"longest pause of one client {pause[0]:.3f}s ({pause[1]})")
        check_history(load)
        for node_id in cluster.config.nodes:
            wait_caught_up(cluster, node_id)
