"""Faults on a real 3-node cluster under load: SIGKILL and SIGSTOP of a shard leader, restart.

The load and the checks are tests/fault_load.py's: linearizable per-key histories, a
strictly serializable list-append history, and multi-shard increments that stay atomic and
count every acknowledged transaction. The killed node restarts with `cluster up` and
catches up. The longest pause clients saw is printed (measured, not asserted).
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster_harness import local_cluster  # noqa: E402
from fault_load import check_history, run_with_fault, wait_caught_up  # noqa: E402

import pykv.client  # noqa: E402
from pykv.server import cmd_status  # noqa: E402


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


def _key_per_shard(core, shards: int) -> dict[int, str]:
    keys: dict[int, str] = {}
    i = 0
    while len(keys) < shards:
        keys.setdefault(core.shard_of(f"k{i}"), f"k{i}")
        i += 1
    return keys


@pytest.mark.slow
def test_a_client_stays_with_the_new_leaders_once_a_frozen_leader_is_passed_over(tmp_path):
    """A SIGSTOPped node is passed over for one attempt timeout only (it may have been slow,
    not frozen). Once another replica of its shards answered as their leader, the client
    must ask that one first, not go back to the frozen node (the first replica) each time its
    suspicion runs out and wait a whole attempt timeout on it again."""
    with local_cluster(tmp_path, nodes=3, partitions=16, state="memory") as cluster:
        with pykv.client.connect(cluster.addresses, timeout=15) as db:
            core = db.backend.core
            keys = _key_per_shard(core, 16)
            for key in keys.values():
                db.put(key, 0)
            view = core.router.map
            # The node that leads the most shards whose first replica it is: without a hint,
            # that is where the client turns first.
            first_and_leader = Counter(view.shards[s][0] for s in keys if cluster.leader_of(s) == view.shards[s][0])
            assert first_and_leader, "no shard is led by its first replica"
            victim = first_and_leader.most_common(1)[0][0]
            router = core.router
            cluster.signal(victim, signal.SIGSTOP)
            try:
                for key in keys.values():  # the failover: some attempts time out on the victim
                    db.put(key, 1)
                time.sleep(2 * router.suspect_for)  # the suspicion of the victim has run out
                before = router.timeouts[victim]
                for n in range(2, 12):
                    for key in keys.values():
                        assert db.get(key) == n - 1
                        db.put(key, n)
                    time.sleep(router.suspect_for / 4)
            finally:
                cluster.signal(victim, signal.SIGCONT)
            assert router.timeouts[victim] == before


@pytest.mark.slow
def test_calls_that_refresh_the_map_at_once_share_one_fetch_and_pass_over_a_frozen_seed(tmp_path):
    """Calls that all failed at once refresh the shard map at once: one fetch serves them
    all, and it asks a node under suspicion (here the first seed, frozen) last. Before,
    each call in turn waited the connect timeout (2 s) on the frozen seed."""
    with local_cluster(tmp_path, nodes=3, partitions=4, state="memory") as cluster:
        victim = cluster.leader_of(0)
        assert victim is not None
        seeds = [cluster.address(victim)] + [a for a in cluster.addresses if a != cluster.address(victim)]
        with pykv.client.connect(seeds, timeout=15) as db:
            core = db.backend.core
            router = core.router
            key = next(f"k{i}" for i in range(1000) if core.shard_of(f"k{i}") == 0)
            router.suspect_for = 30.0  # suspected for the whole test once it timed out
            cluster.signal(victim, signal.SIGSTOP)
            try:
                db.put(key, "frozen leader")  # times out on the victim, the shard's leader, first
                assert router.timeouts[victim] == 1
                fetches = router.map_fetches

                async def refresh_at_once():
                    return await asyncio.gather(*(router.refresh_map() for _ in range(4)))

                maps = db.backend._run(refresh_at_once())
            finally:
                cluster.signal(victim, signal.SIGCONT)
            assert all(m is maps[0] for m in maps)
            assert router.map_fetches == fetches + 1
            assert router.timeouts[victim] == 1


@pytest.mark.slow
def test_a_client_whose_first_seed_is_frozen_connects_without_waiting_for_it(tmp_path):
    """The shard map is asked of the next seed as well once the first has not answered for
    a moment (router.MAP_ASK_STAGGER). A frozen node (SIGSTOP) accepts connections and
    answers nothing: before, connect waited its whole connect timeout (2 s) on the first."""
    with local_cluster(tmp_path, nodes=3, partitions=4, state="memory") as cluster:
        cluster.signal(1, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pykv.client.connect(cluster.addresses, timeout=15) as db:
                connected = time.monotonic() - started
                db.put("k", "while node 1 is frozen")
                assert db.get("k") == "while node 1 is frozen"
                assert connected < db.backend.core.router.connect_timeout
        finally:
            cluster.signal(1, signal.SIGCONT)


@pytest.mark.slow
def test_status_names_the_paused_nodes_and_shows_the_others(tmp_path):
    """`pykv status` with two of three nodes SIGSTOPped, given a paused node's address
    first: it finds the cluster through the node that answers, names each paused node with
    why it did not answer, and shows the live node's groups. Every node is asked at once:
    before, each silent node cost its own timeout, one after the other."""
    with local_cluster(tmp_path, nodes=3, partitions=4, state="memory") as cluster:
        for node in (1, 2):
            cluster.signal(node, signal.SIGSTOP)
        try:
            started = time.monotonic()
            shown = subprocess.run(
                [sys.executable, "-m", "pykv.server.cli", "status", "--json", "--timeout", "3",
                 "--addresses", cluster.address(1), cluster.address(3)],
                capture_output=True, text=True, timeout=60,
            )
            took = time.monotonic() - started
        finally:
            for node in (1, 2):
                cluster.signal(node, signal.SIGCONT)
        statuses = json.loads(shown.stdout)
        assert sorted(statuses) == sorted(cluster.addresses)
        for node in (1, 2):
            assert statuses[cluster.address(node)].startswith(f"node {node}: NotAnswering")
            assert "no HELLO within 3" in statuses[cluster.address(node)]
        assert sorted(statuses[cluster.address(3)]["groups"], key=int) == ["0", "1", "2", "3"]
        assert took < 2 * 3  # one timeout of 3 s in all (one after the other: 9 s)
        # The table calls them "not answering" (likely back soon), not "down" (refused).
        console = Console(width=400, record=True)
        console.print(cmd_status.build_table(statuses))
        rows = {line.split("│")[2].strip(): line for line in console.export_text().splitlines() if "│" in line}
        for node in (1, 2):
            assert "│ not answering (NotAnswering: cannot connect" in rows[cluster.address(node)]
