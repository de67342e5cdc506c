"""Clients that record histories on a real cluster while a test injects faults, and the checks.

The load records single-key reads and writes (unique values), multi-shard transactions
that increment two counters on different shards together, and list-append transactions.
``run_with_fault`` runs it around a fault; ``check_history`` then checks that every
per-key history is linearizable (pykv.sim.linearizability), so no acknowledged write was
lost and no stale leader served a read, and that the list-append transactions form a
strictly serializable history (pykv.sim.listappend, Elle-style cycle search).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

from cluster_harness import LocalCluster

import pykv.client
from pykv.errors import Timeout, TransactionConflict, Unavailable
from pykv.sim.linearizability import READ, WRITE, Op, check_linearizable
from pykv.sim.listappend import Txn, check_serializable

KEYS = [f"reg{i}" for i in range(12)]
LISTS = [f"list{i}" for i in range(6)]


@dataclass
class Load:
    """Client threads recording what they did and when it completed."""

    db: object
    ops: list[Op] = field(default_factory=list)
    # Per client: when each of its operations completed (a client's pause is its longest
    # stretch without one; a gap between any two clients' completions would hide it).
    completions: dict[str, list[float]] = field(default_factory=dict)
    acked_pairs: int = 0
    unknown_pairs: int = 0
    txns: list[Txn] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, op: Op) -> None:
        with self.lock:
            self.ops.append(op)
            if op.ret is not None:
                self.completions.setdefault(f"register-{op.process}", []).append(op.ret)

    def register_client(self, process: int) -> None:
        rng = random.Random(process)
        n = 0
        while not self.stop.is_set():
            key = rng.choice(KEYS)
            call = time.monotonic()
            if rng.random() < 0.5:
                n += 1
                value = f"p{process}-{n}"
                try:
                    self.db.put(key, value)
                    self.record(Op(process, WRITE, key, value, None, call, time.monotonic()))
                except (Timeout, Unavailable):
                    self.record(Op(process, WRITE, key, value, None, call, None))
                except TransactionConflict:
                    pass  # refused (a prepared transaction held the key): not applied
            else:
                try:
                    seen = self.db.get(key)
                    self.record(Op(process, READ, key, None, seen, call, time.monotonic()))
                except (Timeout, Unavailable):
                    pass

    def pair_client(self, key_a: str, key_b: str) -> None:
        while not self.stop.is_set():
            try:
                with self.db.transaction() as tx:
                    tx.incr(key_a, 1)
                    tx.incr(key_b, 1)
                with self.lock:
                    self.acked_pairs += 1
                    self.completions.setdefault("pair", []).append(time.monotonic())
            except (Timeout, Unavailable):
                with self.lock:
                    self.unknown_pairs += 1
            except TransactionConflict:
                pass

    def list_append_client(self, process: int) -> None:
        """Transactions that read two lists and append a unique element to each."""
        rng = random.Random(1000 + process)
        n = 0
        while not self.stop.is_set():
            n += 1
            keys = rng.sample(LISTS, 2)
            ops: list = []
            start = time.monotonic()
            committed: bool | None
            try:
                with self.db.transaction() as tx:
                    for key in keys:
                        seen = tx.get(key)
                        ops.append(("r", key, tuple(seen) if seen is not None else None))
                        element = process * 1_000_000 + n * 10 + keys.index(key)
                        tx.append(key, element)
                        ops.append(("append", key, element))
                committed = True
            except (Timeout, Unavailable):
                committed = None
            except TransactionConflict:
                committed = False
            end = time.monotonic()
            with self.lock:
                self.txns.append(Txn(len(self.txns), tuple(ops), committed, start,
                                     end if committed is not None else None))
                if committed:
                    self.completions.setdefault(f"list-{process}", []).append(end)

    def longest_pause(self, start: float, end: float) -> tuple[float, str]:
        """The longest time one client waited between completions in [start, end], and who."""
        with self.lock:
            clients = {name: sorted(t for t in times if start <= t <= end)
                       for name, times in self.completions.items()}
        pauses = [
            (max(b - a for a, b in zip([start, *times], [*times, end], strict=True)), name)
            for name, times in clients.items()
        ]
        return max(pauses)


def two_keys_on_different_shards(db) -> tuple[str, str]:
    core = db.backend.core
    a = "pair-a"
    i = 0
    while core.shard_of(f"pair-b{i}") == core.shard_of(a):
        i += 1
    return a, f"pair-b{i}"


def run_with_fault(cluster: LocalCluster, fault) -> tuple[Load, tuple[float, str]]:
    db = pykv.client.connect(cluster.addresses, timeout=15)
    load = Load(db)
    key_a, key_b = two_keys_on_different_shards(db)
    threads = [threading.Thread(target=load.register_client, args=(p,)) for p in range(4)]
    threads.append(threading.Thread(target=load.pair_client, args=(key_a, key_b)))
    threads += [threading.Thread(target=load.list_append_client, args=(p,)) for p in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)
        fault_at = time.monotonic()
        fault()
        time.sleep(3.0)
    finally:
        stopped_at = time.monotonic()
        load.stop.set()
        for t in threads:
            t.join(60)
    pause = load.longest_pause(fault_at, stopped_at)
    # Final reads close every key's history: a lost acknowledged write shows up here.
    for key in KEYS:
        call = time.monotonic()
        load.ops.append(Op(99, READ, key, None, db.get(key), call, time.monotonic()))
    counts = (db.get(key_a, 0), db.get(key_b, 0))
    db.close()
    assert counts[0] == counts[1], f"multi-shard increments not atomic: {counts}"
    assert load.acked_pairs <= counts[0] <= load.acked_pairs + load.unknown_pairs
    return load, pause


def check_history(load: Load) -> None:
    writes = sum(1 for op in load.ops if op.kind == WRITE and op.ret is not None)
    assert writes > 20, "the load made no progress"
    result = check_linearizable(load.ops, time_limit_s=60)
    assert result.ok, result.explanation
    assert sum(1 for t in load.txns if t.committed) > 5, "no list-append transaction committed"
    serializable = check_serializable(load.txns, strict=True)
    assert serializable.ok, serializable.explanation


def wait_caught_up(cluster: LocalCluster, node_id: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            mine = cluster.status(node_id)["groups"]
            others = [cluster.status(n)["groups"] for n in cluster.config.nodes if n != node_id]
        except Exception:  # noqa: BLE001 - still starting
            time.sleep(0.1)
            continue
        behind = [
            g for g, s in mine.items()
            if s["applied"] < max(o[g]["commit"] for o in others) or s["leader"] is None
        ]
        if not behind:
            return
        time.sleep(0.1)
    raise AssertionError(f"node {node_id} did not catch up within {timeout}s")
