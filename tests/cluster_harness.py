"""Start a real N-node pykv cluster (separate processes on 127.0.0.1) in a temp dir, for tests.

    with running_cluster(tmp_path, nodes=3) as addresses:
        db = pykv.client.connect(addresses)

Every process is started in its own session by `pykv cluster up` and stopped (SIGTERM,
then SIGKILL of the process group) when the block exits, whatever happens inside.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from pykv.client.admin import fetch_status
from pykv.client.transport import MEMBERS, META_GROUP, Redirect, unwrap
from pykv.errors import Unavailable
from pykv.net.protocol import Connection
from pykv.server.cmd_cluster import (
    cluster_down,
    cluster_up,
    fetch_meta_members,
    load_config,
    read_pid,
    running_nodes,
)


def _ports_free(base: int, count: int) -> bool:
    for port in range(base, base + count):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def free_port_range(count: int) -> int:
    """A base port such that base..base+count-1 are free right now (ephemeral-range safe)."""
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        base = rng.randrange(20000, 30000)
        if _ports_free(base, count):
            return base
    raise RuntimeError("no free port range found")


class LocalCluster:
    """A cluster of node processes under ``data_dir`` (see cmd_cluster for the layout)."""

    def __init__(self, data_dir: Path, nodes: int = 3, **options) -> None:
        self.data_dir = Path(data_dir)
        self.nodes = nodes
        self.options = options
        self.base_port = free_port_range(nodes + 3)  # room for nodes joining later
        self.env: dict | None = None

    def up(self, nodes: int | None = None, timeout: float = 60.0) -> list[str]:
        if nodes is not None:
            self.nodes = nodes
        cluster_up(
            self.data_dir, self.nodes, self.base_port, timeout=timeout, env=self.env, **self.options
        )
        return self.addresses

    def down(self) -> None:
        cluster_down(self.data_dir, timeout=5.0)

    @property
    def config(self):
        config = load_config(self.data_dir)
        assert config is not None, "the cluster was never started"
        return config

    @property
    def addresses(self) -> list[str]:
        return [self.config.nodes[n] for n in sorted(self.config.nodes)]

    def address(self, node_id: int) -> str:
        return self.config.nodes[node_id]

    def pid(self, node_id: int) -> int | None:
        return read_pid(self.data_dir, node_id)

    def alive(self) -> dict[int, int]:
        return running_nodes(self.config, self.data_dir)

    def signal(self, node_id: int, sig: int) -> None:
        pid = self.pid(node_id)
        assert pid is not None, f"node {node_id} has no pid file"
        os.killpg(pid, sig)

    def kill(self, node_id: int, timeout: float = 30.0) -> None:
        """SIGKILL a node and wait until it is gone.

        A process dies only once its threads leave the kernel (an fsync on a busy disk can
        take seconds), and a `cluster up` meanwhile would take it for running and not
        restart it: so wait, and fail clearly if it outlives the timeout.
        """
        self.signal(node_id, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while node_id in self.alive():
            assert time.monotonic() < deadline, f"node {node_id} still alive {timeout}s after SIGKILL"
            time.sleep(0.02)

    def status(self, node_id: int) -> dict:
        return fetch_status(self.address(node_id), timeout=2.0)

    def leader_of(self, shard: int, *, among: list[int] | None = None) -> int | None:
        """The leader of a shard as the reachable nodes report it (None when unknown)."""
        for node_id in among or sorted(self.config.nodes):
            try:
                group = self.status(node_id)["groups"].get(str(shard))
            except Exception:  # noqa: BLE001 - a stopped node does not answer
                continue
            if group and group["role"] == "leader":
                return node_id
        return None

    def meta_members(self) -> dict:
        """The metadata group as its leader reports it (MEMBERS on META_GROUP, routed by the
        live nodes' view): {leader, voters, learners, commit, match}."""
        return fetch_meta_members([self.address(n) for n in sorted(self.alive())])

    def hosts_meta(self, node_id: int) -> bool:
        """Whether a node hosts a replica of the metadata group (asked of that node only)."""

        async def ask() -> bool:
            conn = await Connection.open(self.address(node_id), timeout=2.0)
            try:
                unwrap(await conn.request(MEMBERS, [META_GROUP], 2.0))
            except Redirect:
                return True  # a follower of the group
            except Unavailable:
                return False  # "does not host shard group ..."
            finally:
                conn.close()
            return True  # its leader

        return asyncio.run(ask())

    def log_text(self, node_id: int) -> str:
        path = self.data_dir / f"node-{node_id}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def print_log_tails(self, lines: int = 30) -> None:
        """The last lines of every node's log, on stdout."""
        with contextlib.suppress(Exception):
            for node_id in sorted(self.config.nodes):
                tail = self.log_text(node_id).splitlines()[-lines:]
                print(f"--- node {node_id}: last {len(tail)} log lines ---", *tail, sep="\n")


def wipe_cluster(addresses: list[str]) -> None:
    """Empty a running cluster: every key, resolver registration and remembered outcome.

    Lets a test suite share one cluster between tests that each expect an empty store.
    """
    import pykv.client

    with pykv.client.connect(addresses) as db:
        deadline = time.monotonic() + 10
        while True:
            try:
                db.backend.wipe()
                return
            except pykv.TransactionConflict:
                # A shard refuses while a 2PC transaction is prepared: the previous test's
                # last commit is acknowledged before the coordinator's FINISH reaches the
                # other participants, so give it a moment.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)


@contextlib.contextmanager
def local_cluster(tmp_path: Path, nodes: int = 3, **options) -> Iterator[LocalCluster]:
    """A started LocalCluster, always stopped on exit (SIGCONT first, in case one was stopped)."""
    cluster = LocalCluster(Path(tmp_path) / "cluster", nodes, **options)
    try:
        cluster.up()
        yield cluster
    except BaseException:
        cluster.print_log_tails()  # pytest shows it with the failure (CI keeps no data dir)
        raise
    finally:
        with contextlib.suppress(Exception):
            for node_id in cluster.alive():
                cluster.signal(node_id, signal.SIGCONT)
        cluster.down()


@contextlib.contextmanager
def running_cluster(tmp_path: Path, nodes: int = 3, **options) -> Iterator[list[str]]:
    """The addresses of a started N-node cluster, stopped again when the block exits."""
    with local_cluster(tmp_path, nodes, **options) as cluster:
        yield cluster.addresses
