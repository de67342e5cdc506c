"""CPU of the replica path per transaction: three ReplicaHosts in one process, no network.

A node's CPU under the cluster bench is mostly this path: Raft (propose, append, persist,
acknowledge, commit) and every replica applying the shard commands of two-phase commit
to stored shards. Driving three real hosts in one process, messages handed over by hand,
measures it without sockets, framing or the client, and without the neighbours' noise
that makes the cluster bench vary by 20% from run to run (CPU time, best of a few runs).

The workload is the standard transaction's commit over 3 shards (DESIGN §7: reads of 2
keys, one of them written back, and a blind write): optimistic reads on the leaders,
PREPARE on 2 shards, COMMIT_DECIDE on the coordinator shard, FINISH on the 2, in waves of
64 transactions at once, on 16 stored shards. Baseline in the same run: as many NOOP
commands through the same hosts (Raft and the host alone, no state machine work).

    python3 benchmarks/bench_replica.py [--txns 3000]
    python3 -m pytest benchmarks/bench_replica.py -q -p no:randomly
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pykv.raft.node import RaftConfig
from pykv.replica.durable import NodeLog
from pykv.replica.host import ReplicaHost
from pykv.replica.shard import COMMIT_DECIDE, FINISH, NOOP, PREPARE
from pykv.replica.stored import StoredShardState
from pykv.txn.model import CommitRequest, Versioned, WriteOp
from pykv.types import OpKind

GROUPS = 16
KEYS = 100_000
WAVE = 64
VALUE = b"v" * 100


class Hosts:
    """Three hosts of GROUPS stored shards, driven a round at a time (tests/replica/test_host)."""

    def __init__(self, root: Path) -> None:
        self.hosts = {
            node: ReplicaHost(
                node,
                NodeLog(root / f"n{node}", fsync="off"),
                raft_config=RaftConfig(election_ticks=10, heartbeat_ticks=3),
                rng=random.Random(node),
                state_factory=lambda gid, node=node: StoredShardState(gid, root / f"n{node}" / f"g{gid}"),
            )
            for node in (1, 2, 3)
        }
        for host in self.hosts.values():
            for gid in range(GROUPS):
                host.add_group(gid, [1, 2, 3])
        self.rounds = 0
        self.until(lambda: all(self.leader(g) is not None for g in range(GROUPS)))

    def leader(self, gid: int) -> ReplicaHost | None:
        return next((h for h in self.hosts.values() if h.groups[gid].raft.is_leader()), None)

    def round(self) -> None:
        self.rounds += 1
        inbox = []
        for host in self.hosts.values():
            if self.rounds % 3 == 0:  # a node ticks every 10 ms and steps every ~4 ms
                host.tick()
            batch = host.collect()
            host.persist(batch)
            inbox += batch.early + batch.late
            host.apply(batch)
        for msg in inbox:
            self.hosts[msg.to].step(msg)

    def until(self, condition: Callable[[], bool], rounds: int = 10_000) -> None:
        for _ in range(rounds):
            if condition():
                return
            self.round()
        raise RuntimeError("the hosts made no progress")

    def run(self, proposals: list[tuple[int, str, list]]) -> list:
        """Propose each (group, tag, args) on its group's leader; their results, once applied."""
        results: list = []
        for gid, tag, args in proposals:
            self.leader(gid).propose(gid, tag, args, lambda r, e: results.append(e or r))
        self.until(lambda: len(results) == len(proposals))
        return results


def _transactions(rng: random.Random, count: int, first_txid: int) -> list[tuple[int, list[int], list[str]]]:
    """(txid, shards, keys) of ``count`` transactions over 3 different shards each: the keys
    read and written back, read only, written blind."""
    out: list[tuple[int, list[int], list[str]]] = []
    used: set[str] = set()  # no two of a wave share a key: none finds another's lock
    while len(out) < count:
        shards = rng.sample(range(GROUPS), 3)
        keys = [f"k{rng.randrange(KEYS) // GROUPS * GROUPS + s:06d}" for s in shards]
        if used.isdisjoint(keys):
            used.update(keys)
            out.append((first_txid + len(out), shards, keys))
    return out


def _shard_of(key: str) -> int:
    return int(key[1:]) % GROUPS


def _read(hosts: Hosts, key: str) -> Versioned:
    gid = _shard_of(key)
    answered, version = hosts.leader(gid).read_now(gid, lambda state: state.get(key), (key,))
    assert answered, "a wave's keys are never locked when it reads them"
    return version


def commit_wave(hosts: Hosts, wave: list[tuple[int, list[int], list[str]]]) -> None:
    """Read, prepare, decide and finish a wave of transactions, as clients and nodes do."""
    prepares, decides, finishes = [], [], []
    for txid, shards, (read_write, read_only, blind) in wave:
        reads = {k: _read(hosts, k) for k in (read_write, read_only)}
        writes = (WriteOp(read_write, OpKind.PUT, VALUE, reads[read_write]), WriteOp(blind, OpKind.PUT, VALUE))
        request = CommitRequest(txid, 1, reads, writes, timestamp=txid)
        coordinator, others = shards[0], shards[1:]
        parts = {s: {k for k in (read_write, read_only, blind) if _shard_of(k) == s} for s in shards}
        prepares += [(s, PREPARE, [request.to_wire(parts[s]), coordinator, shards]) for s in others]
        decides.append((coordinator, COMMIT_DECIDE, [request.to_wire(parts[coordinator]), others]))
        finishes += [(s, FINISH, [txid, True]) for s in others]
    for phase in (prepares, decides, finishes):
        refused = [r for r in hosts.run(phase) if r is not None]
        assert not refused, f"{len(refused)} refused, e.g. {refused[0]}"


def noop_wave(hosts: Hosts, wave: list[tuple[int, list[int], list[str]]]) -> None:
    """As many NOOP commands as commit_wave proposes (5 per transaction), on the same groups."""
    for part in (1, 2, 3):  # two prepares, one decision, two finishes: three rounds
        picked = (0,) if part == 2 else (1, 2)
        hosts.run([(shards[i], NOOP, []) for _, shards, _ in wave for i in picked])


def cpu_per_txn(wave_fn: Callable, txns: int, seed: int = 7) -> float:
    """CPU seconds per transaction of ``wave_fn`` over ``txns`` transactions (fresh hosts)."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as root:
        hosts = Hosts(Path(root))
        waves = [_transactions(rng, WAVE, 1 + w * WAVE) for w in range(txns // WAVE)]
        started = time.process_time()
        for wave in waves:
            wave_fn(hosts, wave)
        spent = time.process_time() - started
        for host in hosts.hosts.values():
            host.close()
    return spent / (len(waves) * WAVE)


def test_replica_path_cpu(benchmark, record) -> None:
    def both() -> tuple[float, float]:
        return cpu_per_txn(commit_wave, 640), cpu_per_txn(noop_wave, 640)

    commit, noop = benchmark.pedantic(both, rounds=3, iterations=1)
    record("replica path, per transaction", "2PC over 3 shards", commit, subject=True)
    record("replica path, per transaction", "as many NOOPs", noop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--txns", type=int, default=3200)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    commit = min(cpu_per_txn(commit_wave, args.txns) for _ in range(args.runs))
    noop = min(cpu_per_txn(noop_wave, args.txns) for _ in range(args.runs))
    print(f"CPU per transaction, best of {args.runs} runs of {args.txns} (3 hosts in one process):")
    print(f"  2PC over 3 shards (5 commands, 3 replicas)  {commit * 1000:.3f} ms")
    print(f"  as many NOOP commands (Raft and host only)  {noop * 1000:.3f} ms")
    print(f"  state machine share                          {1 - noop / commit:.0%}")


if __name__ == "__main__":
    main()
