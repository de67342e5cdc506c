"""The standard 4-op transaction on a real 3-node cluster, against the embedded store (same run).

A 3-node cluster (separate processes on 127.0.0.1, every commit fsync'd on a majority)
runs the DESIGN §7 workload through pykv.client.connect: read 2 keys, write 2 (one
read-modify-write, one blind), keys uniform over 100,000, 100-byte values, N clients with
one transaction in flight each. The embedded store (pykv.open, fsync="always") runs the
same workload as the baseline; figures are reported (tps, p50/p99, aborts, and the ratio
to the embedded store, what one node leaves on disk, and the nodes' read-cache hit rate),
never asserted.

    python3 -m pytest benchmarks/bench_cluster.py --benchmark-only -s     # 64 clients, 5 s
    python3 benchmarks/bench_cluster.py --clients 64 --duration 10 [--partitions 16] [--state memory]
                                        [--threads: threads on pykv.connect, not pykv.aio]
    python3 benchmarks/bench_cluster.py --idle [--partitions 16 128]   # CPU of an idle cluster
    python3 benchmarks/bench_cluster.py --latency [--ops 1000]   # one client, one op at a time

An idle cluster's groups quiesce (no ticks, no heartbeats; only one keepalive per node pair);
``--idle`` reports what each node still spends (ms of CPU per second, and per hosted group),
the price of hosting many shards, against a bare uvloop process ticking as often (same run),
and how many times a second node 1's loop polls.

``--latency`` is the other end: one client with one operation in flight (a get, a put, a
transaction writing 2 keys, the 4-op transaction, a read-only transaction of 8 keys read one
at a time or with one get_many, and a get_many snapshot of them), p50/p90 of each, against the same on the
embedded store (fsync="always") in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pykv
import pykv.client
from pykv.client.admin import fetch_status
from pykv.server.cmd_cluster import ClusterConfig, cluster_down, cluster_up, running_nodes
from pykv.server.workload import (
    WorkloadConfig,
    percentile,
    preload,
    run_workload,
    run_workload_on_cluster,
)


def _free_base_port(count: int) -> int:
    for base in range(27000, 40000, 17):
        ok = True
        for port in range(base, base + count):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free ports")


def _cluster_costs(config: ClusterConfig, data: Path, addresses: list[str]) -> dict:
    """Counters summed over the nodes, and the nodes' CPU seconds (user + system) so far."""
    totals: dict[str, float] = {"node_cpu_s": 0.0}
    for pid in running_nodes(config, data).values():
        totals["node_cpu_s"] += _cpu_seconds(pid)
    for address in addresses:
        status = fetch_status(address)
        for name, value in status.get("counters", {}).items():
            totals[name] = totals.get(name, 0) + value
        for name in ("hits", "misses"):  # the read cache (none when values are in memory)
            totals[f"cache_{name}"] = totals.get(f"cache_{name}", 0) + (status.get("cache") or {}).get(name, 0)
    totals["client_cpu_s"] = time.process_time()
    return totals


def _disk_mb(node_dir: Path) -> dict[str, float]:
    """MB on disk of one node's WAL (the Raft log of all its groups), of its shards' storage,
    and in all: what the run leaves behind, however long it ran, once compaction keeps up."""
    def size(path: Path) -> float:
        return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6, 1)

    return {"wal": size(node_dir / "wal"), "shards": size(node_dir / "shards"), "all": size(node_dir)}


def _cache_hit_rate(totals: dict) -> float | None:
    """The share of the nodes' reads of shard values found in their read caches since they
    started (None when the values are in memory, or nothing was read)."""
    hits, misses = totals["cache_hits"], totals["cache_misses"]
    return round(hits / (hits + misses), 4) if hits + misses else None


def _cpu_seconds(pid: int) -> float:
    """A process's CPU seconds so far (user + system)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _per_txn(before: dict, after: dict, committed: int) -> dict:
    """What one committed transaction cost the cluster: CPU, requests, Raft messages."""
    n = max(committed, 1)
    out = {}
    for name, unit, scale in (("node_cpu_s", "node_cpu_ms_per_txn", 1000), ("client_cpu_s", "client_cpu_ms_per_txn", 1000),
                              ("requests", "requests_per_txn", 1), ("raft_messages_out", "raft_messages_per_txn", 1),
                              ("raft_frames_out", "raft_frames_per_txn", 1), ("batches", "batches_per_txn", 1)):
        out[unit] = round((after.get(name, 0) - before.get(name, 0)) * scale / n, 3)
    return out


def bench_cluster(
    clients: int, duration: float, partitions: int = 16, keys: int = 100_000,
    state: str = "storage", threads: bool = False, reads: str = "safe", value_bytes: int = 100,
) -> dict:
    config = WorkloadConfig(keys=keys, value_bytes=value_bytes, ops=4, clients=clients, duration=duration)
    with tempfile.TemporaryDirectory(prefix="pykv-bench-cluster-") as tmp:
        data = Path(tmp)
        base = _free_base_port(3)
        addresses = [f"127.0.0.1:{base + i}" for i in range(3)]
        try:
            cluster = cluster_up(data, 3, base, partitions=partitions, state=state, reads=reads)
            with pykv.client.connect([f"127.0.0.1:{base}"], timeout=30) as db:
                preload(db, config)
                before = _cluster_costs(cluster, data, addresses)
                if threads:
                    result = run_workload(db, config).to_dict()
            if not threads:
                result = run_workload_on_cluster([f"127.0.0.1:{base}"], config).to_dict()
                result["client"] = "aio"
            after = _cluster_costs(cluster, data, addresses)
            result.update(_per_txn(before, after, result["committed"]))
            result["partitions"] = partitions
            result["reads"] = reads
            result["disk_mb_per_node"] = _disk_mb(data / "node-1")
            result["cache_hit_rate"] = _cache_hit_rate(after)
            return result
        finally:
            cluster_down(data)


# The baseline of an idle node: a bare uvloop process that only wakes every 10 ms (a
# node's tick), the least a ticking node can cost.
_TICKING_LOOP = """
import asyncio, uvloop
async def main():
    while True:
        await asyncio.sleep(0.01)
uvloop.run(main())
"""


def bench_idle(partitions: int, seconds: float = 5.0) -> dict:
    """CPU that each node of an idle 3-node cluster spends per second (ticks, keepalives),
    against a bare loop ticking as often, and how often node 1's loop polls (strace)."""
    ticking = subprocess.Popen([sys.executable, "-c", _TICKING_LOOP])
    try:
        time.sleep(1.0)
        before = _cpu_seconds(ticking.pid)
        time.sleep(seconds)
        loop_ms_per_s = (_cpu_seconds(ticking.pid) - before) / seconds * 1000
    finally:
        ticking.kill()
        ticking.wait()
    with tempfile.TemporaryDirectory(prefix="pykv-bench-idle-") as tmp:
        data = Path(tmp)
        base = _free_base_port(3)
        addresses = [f"127.0.0.1:{base + i}" for i in range(3)]
        try:
            cluster = cluster_up(data, 3, base, partitions=partitions)
            time.sleep(3.0)  # the first elections settle, then idle groups quiesce (1 s idle)
            before = _cluster_costs(cluster, data, addresses)["node_cpu_s"]
            time.sleep(seconds)
            spent = _cluster_costs(cluster, data, addresses)["node_cpu_s"] - before
            polls = _polls_per_second(running_nodes(cluster, data)[1])
        finally:
            cluster_down(data)
    per_node = spent / 3 / seconds * 1000
    return {"partitions": partitions, "node_cpu_ms_per_s": round(per_node, 1),
            "node_cpu_ms_per_s_per_group": round(per_node / (partitions + 1), 3),
            "ticking_loop_cpu_ms_per_s": round(loop_ms_per_s, 1),
            "node_over_ticking_loop": round(per_node / loop_ms_per_s, 2) if loop_ms_per_s else None,
            "node1_epoll_calls_per_s": polls}


def _polls_per_second(pid: int, seconds: float = 2.0) -> float | None:
    """How often the process's main thread polls its loop (None without strace)."""
    if shutil.which("strace") is None:
        return None
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as out:
        subprocess.run(["timeout", "-s", "INT", str(seconds), "strace", "-c", "-e", "trace=epoll_pwait,epoll_wait",
                        "-p", str(pid), "-o", out.name], capture_output=True, check=False)
        rows = [line.split() for line in out.read().splitlines() if "epoll" in line]
    return round(sum(int(r[3]) for r in rows if len(r) >= 5) / seconds, 1) if rows else None


def _latencies(db: pykv.KeyValueStore, ops: int) -> dict:
    """p50/p90 (ms) of each kind of operation, one at a time, on ``db``."""
    counter = iter(range(1 << 62))

    def get() -> None:
        db.get(f"k{next(counter) % 1000}")

    def put() -> None:
        db.put(f"k{next(counter) % 1000}", b"x" * 100)

    def two_writes() -> None:  # on two shards, mostly: prepare, then commit
        i = next(counter)
        with db.transaction() as tx:
            tx.put(f"a{i}", i)
            tx.put(f"b{i}", i)

    def four_ops() -> None:  # the standard transaction: 2 reads, 2 writes
        i = next(counter)
        with db.transaction() as tx:
            tx.get(f"k{i % 1000}")
            tx.put(f"k{(i + 3) % 1000}", tx.get(f"k{(i + 7) % 1000}", 0))
            tx.put(f"k{(i + 5) % 1000}", i)

    eight = [f"k{i}" for i in range(0, 1000, 125)]  # spread over the shards

    def eight_gets() -> None:  # a transaction reading 8 keys one at a time
        with db.transaction() as tx:
            for key in eight:
                tx.get(key)

    def get_many_8() -> None:  # the same 8 reads, fetched together (a request per shard)
        with db.transaction() as tx:
            tx.get_many(eight)

    def snapshot_8() -> None:  # one snapshot of the 8 keys, no transaction
        db.get_many(eight)

    out = {}
    kinds = (("get", get), ("put", put), ("txn_2_writes", two_writes), ("txn_4_ops", four_ops),
             ("txn_8_gets", eight_gets), ("txn_get_many_8", get_many_8), ("get_many_8", snapshot_8))
    for name, op in kinds:
        for _ in range(min(50, ops)):  # warm: connections, the shard map, caches
            op()
        took = []
        for _ in range(ops):
            started = time.perf_counter()
            op()
            took.append((time.perf_counter() - started) * 1000)
        took.sort()
        out[name] = {"p50_ms": round(percentile(took, 50), 3), "p90_ms": round(percentile(took, 90), 3)}
    return out


def bench_latency(ops: int, partitions: int = 16) -> dict:
    """One client, one operation at a time: the cluster's latencies against the embedded store's."""
    with tempfile.TemporaryDirectory(prefix="pykv-bench-latency-") as tmp:
        data = Path(tmp)
        with pykv.open(data / "embedded") as db:
            embedded = _latencies(db, ops)
        base = _free_base_port(3)
        try:
            cluster_up(data / "cluster", 3, base, partitions=partitions)
            with pykv.client.connect([f"127.0.0.1:{base}"], timeout=30) as db:
                cluster = _latencies(db, ops)
        finally:
            cluster_down(data / "cluster")
    ratios = {name: round(cluster[name]["p50_ms"] / max(embedded[name]["p50_ms"], 1e-9), 2) for name in cluster}
    return {"cluster": cluster, "embedded": embedded, "cluster_over_embedded_p50": ratios}


def bench_embedded(clients: int, duration: float, keys: int = 100_000) -> dict:
    config = WorkloadConfig(keys=keys, value_bytes=100, ops=4, clients=clients, duration=duration)
    with tempfile.TemporaryDirectory(prefix="pykv-bench-embedded-") as tmp:
        with pykv.open(Path(tmp) / "db") as db:
            preload(db, config)
            return run_workload(db, config).to_dict()


def test_cluster_against_embedded(benchmark, record) -> None:
    """pytest-benchmark entry: 64 clients for 5 s on each; ratios in the run's summary."""
    runs = benchmark.pedantic(
        lambda: {"cluster": bench_cluster(64, 5.0), "embedded": bench_embedded(64, 5.0)},
        rounds=1, iterations=1,
    )
    for name, result in runs.items():
        for field in ("tps", "p50_ms", "p99_ms", "aborts", "errors"):
            benchmark.extra_info[f"{name}.{field}"] = result[field]
        record("4-op txn, 64 clients", name, result["duration_s"], units=result["committed"],
               subject=name == "cluster")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--partitions", type=int, nargs="+", default=[16])
    parser.add_argument("--idle", action="store_true",
                        help="measure an idle cluster's CPU per node for each --partitions")
    parser.add_argument("--latency", action="store_true",
                        help="one client, one operation at a time: p50/p90 of each kind")
    parser.add_argument("--ops", type=int, default=1000, help="operations of each kind for --latency")
    parser.add_argument("--value-bytes", type=int, default=100,
                        help="value size (1000 makes 100 MB per node, more than the 64 MiB cache)")
    parser.add_argument("--state", choices=["storage", "memory"], default="storage")
    parser.add_argument("--threads", action="store_true",
                        help="drive the cluster from threads on one pykv.connect client "
                             "(default: coroutines on one pykv.aio client, as pykv bench does)")
    parser.add_argument("--reads", choices=["safe", "lease"], default="safe",
                        help="how shard leaders confirm reads (see pykv serve --help)")
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    if args.idle:
        print(json.dumps([bench_idle(p) for p in args.partitions]))
        return
    if args.latency:
        print(json.dumps(bench_latency(args.ops, args.partitions[0])))
        return
    out = {"cluster": bench_cluster(args.clients, args.duration, args.partitions[0], state=args.state,
                                    threads=args.threads, reads=args.reads, value_bytes=args.value_bytes)}
    if not args.no_baseline:
        out["embedded"] = bench_embedded(args.clients, args.duration)
        out["cluster_over_embedded_tps"] = round(out["cluster"]["tps"] / max(out["embedded"]["tps"], 1e-9), 4)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
