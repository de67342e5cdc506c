"""`pykv cluster up|down`: start, restart, grow or stop a local cluster of node processes."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

import pykv
from pykv.client.admin import fetch_status, request_leave
from pykv.client.router import Router
from pykv.client.transport import MEMBERS, META_GROUP
from pykv.errors import CorruptData, Error, InvalidArgument
from pykv.net.framing import CLUSTER_MAX_FRAME
from pykv.server.identity import new_cluster_id, read_identity
from pykv.storage.files import replace_atomically

CONFIG_NAME = "cluster.json"
# Partitions are fixed for the life of a cluster (no split or merge), so the default leaves
# room to grow (Q >> N) rather than fitting 3 nodes; see PARTITIONS_HELP for the cost.
DEFAULT_PARTITIONS = 16
PARTITIONS_HELP = (
    "shards of the key space, fixed for the life of the cluster (default 16: room to grow to "
    "about 16 nodes). A transaction over 2+ shards is a two-phase commit (3 Raft commands for "
    "2 shards, 5 for 3, against 1), so a cluster that will stay at 3 nodes commits more 4-op "
    "transactions per second with fewer partitions (benchmarks/bench_cluster.py on 2 cores: "
    "1 partition 2,832 tps, 3 partitions 1,713, 16 partitions 1,208)"
)
DEFAULT_REPLICAS = 3
DEFAULT_VNODES = 64
DEFAULT_DEAD_AFTER = 300.0
DEFAULT_MAX_FRAME_MB = CLUSTER_MAX_FRAME / (1 << 20)  # big transactions fit; snapshots go in chunks
# Seconds a prepare waits for its decision (NodeConfig.recovery_after). At least 1: a
# consistent scan renews its range lock every 0.5 s (commitflow.LOCK_RENEW_EVERY).
DEFAULT_RECOVERY_AFTER = 2.0
DEAD_AFTER_HELP = (
    "seconds a node may stay unreachable before the metadata leader takes it out of the shard "
    "map, as `cluster remove` would, and its shards move to live nodes (default 300; 0 = never). "
    "Never done while fewer than R live nodes would remain, and one node at a time"
)


@dataclass
class ClusterConfig:
    """What `cluster up` wrote into DIR/cluster.json, so that a re-`up` starts the same nodes."""

    nodes: dict[int, str] = field(default_factory=dict)  # node id -> "host:port"
    partitions: int = DEFAULT_PARTITIONS
    replicas: int = DEFAULT_REPLICAS
    vnodes: int = DEFAULT_VNODES
    initial: list[int] = field(default_factory=list)  # the members that bootstrapped it
    state: str = "storage"  # where shard values live: "storage" (on disk) or "memory" (+ snapshots)
    removed: list[int] = field(default_factory=list)  # ids taken out with `cluster remove`
    reads: str = "safe"  # how leaders confirm reads: "safe" (ReadIndex) or "lease"
    dead_after: float = DEFAULT_DEAD_AFTER  # seconds before an unreachable node is replaced
    cache_mb: float = 64.0  # each node's read cache of shard values, shared by its shards
    max_frame_mb: float = DEFAULT_MAX_FRAME_MB  # the largest frame a node sends or accepts
    snapshot_every: int | None = None  # entries between snapshots (None: the node's budget)
    recovery_after: float = DEFAULT_RECOVERY_AFTER  # seconds before a prepare is settled
    # Every node ran and the cluster was ready once: from then on a node that starts with an
    # empty data directory lost its data (`pykv serve --existing`). Before, it never voted,
    # and founding its groups is safe.
    formed: bool = False
    # Every node is started with it (`pykv serve --cluster-id`): nodes and clients refuse
    # peers of another cluster. Empty only in a cluster.json from before it existed.
    cluster_id: str = ""

    def active(self) -> dict[int, str]:
        return {n: a for n, a in self.nodes.items() if n not in self.removed}

    def to_json(self) -> str:
        raw = asdict(self)
        raw["nodes"] = {str(k): v for k, v in sorted(self.nodes.items())}
        return json.dumps(raw, indent=2)

    @classmethod
    def from_json(cls, raw: dict) -> ClusterConfig:
        """The saved config (``cluster.json``, decoded); settings it predates take their
        defaults."""
        known = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in raw.items() if k in known})
        config.nodes = {int(k): v for k, v in config.nodes.items()}
        return config


def load_config(data_dir: Path) -> ClusterConfig | None:
    path = data_dir / CONFIG_NAME
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        config = ClusterConfig.from_json(raw)
    except (ValueError, TypeError, AttributeError) as exc:
        raise CorruptData(f"{path} is not a cluster config as `pykv cluster up` writes it "
                          f"({type(exc).__name__}: {exc}): fix it, or remove it and run `cluster "
                          "up` again with the cluster's --nodes, --base-port and --partitions") from None
    if "formed" not in raw:
        # Saved by a release before `formed`: a node with a WAL ran, so the cluster did (its
        # nodes vote), and a node that comes back empty must rejoin, not found its groups.
        config.formed = _nodes_ran(config, data_dir)
    return config


def _nodes_ran(config: ClusterConfig, data_dir: Path) -> bool:
    """Whether any node of the cluster ran: then its nodes vote, and one that comes back
    with an empty directory lost its data (it must rejoin, not found its groups)."""
    return any((data_dir / f"node-{n}" / "wal").exists() for n in config.nodes)


def _recorded_cluster_id(config: ClusterConfig, data_dir: Path) -> str | None:
    """The cluster id a node's directory records, if any does."""
    for node_id in sorted(config.nodes):
        recorded = read_identity(data_dir / f"node-{node_id}")
        if recorded is not None:
            return recorded.cluster
    return None


def save_config(data_dir: Path, config: ClusterConfig) -> None:
    # Durably: a cluster.json lost or emptied by a power cut would leave nodes nobody knows.
    replace_atomically(str(data_dir / CONFIG_NAME), config.to_json().encode())


def pid_path(data_dir: Path, node_id: int) -> Path:
    return data_dir / f"node-{node_id}.pid"


def read_pid(data_dir: Path, node_id: int) -> int | None:
    try:
        return int(pid_path(data_dir, node_id).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0); reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return _not_zombie(pid)


def _not_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def serve_command(config: ClusterConfig, node_id: int, data_dir: Path, *, existing: bool = False) -> list[str]:
    """The argv that runs one node of this cluster (``existing``: restarting it)."""
    peers = ",".join(f"{nid}={addr}" for nid, addr in sorted(config.nodes.items()))
    argv = [
        sys.executable, "-m", "pykv.server.cli", "serve",
        "--id", str(node_id),
        "--listen", config.nodes[node_id],
        "--peers", peers,
        "--initial", ",".join(str(n) for n in config.initial),
        "--data-dir", str(data_dir / f"node-{node_id}"),
        "--partitions", str(config.partitions),
        "--replicas", str(config.replicas),
        "--vnodes", str(config.vnodes),
        "--state", config.state,
        "--reads", config.reads,
        "--dead-after", str(config.dead_after),
        "--cache-mb", str(config.cache_mb),
        "--max-frame-mb", str(config.max_frame_mb),
        "--recovery-after", str(config.recovery_after),
        "--cluster-id", config.cluster_id,
    ]
    if config.snapshot_every is not None:
        argv += ["--snapshot-every", str(config.snapshot_every)]
    if existing:
        argv.append("--existing")
    return argv


def start_node(config: ClusterConfig, node_id: int, data_dir: Path, env: dict | None = None,
               *, existing: bool = False) -> int:
    """Start one node detached (its own session), logging to DIR/node-ID.log; return its pid.
    ``existing``: the cluster was started before (see `pykv serve --existing`)."""
    # Nodes run the same pykv as this launcher, installed or not.
    env = dict(os.environ if env is None else env)
    package_root = str(Path(pykv.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    log = open(data_dir / f"node-{node_id}.log", "ab")
    try:
        proc = subprocess.Popen(
            serve_command(config, node_id, data_dir, existing=existing),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    finally:
        log.close()
    pid_path(data_dir, node_id).write_text(f"{proc.pid}\n")
    return proc.pid


def running_nodes(
    config: ClusterConfig, data_dir: Path, *, include_removed: bool = False
) -> dict[int, int]:
    """node id -> pid for every (active, unless include_removed) node whose process is alive."""
    alive = {}
    for node_id in config.nodes if include_removed else config.active():
        pid = read_pid(data_dir, node_id)
        if pid is not None and pid_alive(pid):
            alive[node_id] = pid
    return alive


class NodeExited(TimeoutError):
    """A node process exited before the cluster was ready (a port in use, a bad data
    directory...): waiting longer would not help. A TimeoutError, so that callers that
    report a cluster that did not come up report this too."""


def _last_complaint(log_path: Path) -> str:
    """The last line of a node's log that is not a traceback's frame: usually the error."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return "(no log)"
    said = [line for line in lines if line.strip() and not line.startswith((" ", "\t", "Traceback"))]
    return said[-1] if said else "(an empty log)"


def _check_still_running(data_dir: Path, node_id: int, pid: int) -> None:
    """NodeExited when the process ``pid`` that was started for node_id is gone (and no
    other has been started for it since: the pid file still names it)."""
    if read_pid(data_dir, node_id) == pid and not pid_alive(pid):
        log_path = data_dir / f"node-{node_id}.log"
        raise NodeExited(f"node {node_id} (pid {pid}) exited: {_last_complaint(log_path)}")


def _status_table(rows: dict[int, str]) -> Table:
    table = Table(title="pykv cluster")
    table.add_column("node")
    table.add_column("state")
    for node_id, state in sorted(rows.items()):
        table.add_row(str(node_id), state)
    return table


def wait_until_ready(
    config: ClusterConfig, timeout: float, console: Console | None = None,
    data_dir: Path | None = None, failure: str = "not every shard had a leader",
    started: dict[int, int] | None = None,
) -> set[int]:
    """Poll every node until every shard it knows of has a leader.

    Returns the nodes that found themselves taken out of the cluster while they were down
    (by ``cluster remove`` elsewhere, or as dead after --dead-after): they host nothing and
    never join again, so they are not waited for. On timeout, raises TimeoutError with
    ``failure`` and what each node reported last. ``started``: node id -> pid of the
    processes the caller just started; NodeExited as soon as one of them is gone (a node
    already running that dies meanwhile may be restarted by someone else: waited for).
    """
    deadline = time.monotonic() + timeout
    rows = {nid: "starting" for nid in config.active()}
    removed: set[int] = set()
    live = Live(_status_table(rows), console=console, transient=False) if console else None
    if live:
        live.start()
    try:
        while time.monotonic() < deadline:
            ready = True
            for node_id, addr in config.active().items():
                if data_dir is not None and started and node_id in started:
                    _check_still_running(data_dir, node_id, started[node_id])
                try:
                    status = fetch_status(addr, timeout=1.0)
                except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
                    rows[node_id] = f"waiting ({type(exc).__name__})"
                    ready = False
                    continue
                pid = read_pid(data_dir, node_id) if data_dir is not None else None
                if status.get("node_id") != node_id or (pid is not None and status.get("pid") != pid):
                    # Another process answers on this node's port (a stale node of some
                    # other cluster): never take it for ours.
                    rows[node_id] = f"port taken by pid {status.get('pid')} (node {status.get('node_id')})"
                    ready = False
                    continue
                if status.get("removed"):
                    removed.add(node_id)
                    rows[node_id] = "removed from the cluster while it was down"
                    continue
                groups = status["groups"]
                led = sum(1 for g in groups.values() if g["leader"])
                moves = status.get("pending_moves", 0)
                map_nodes = set(status.get("map_nodes", config.active()))
                members = set(config.active()) - removed
                joined = members <= map_nodes and not map_nodes & set(config.removed)
                rows[node_id] = f"{led}/{len(groups)} groups have a leader" + (
                    f", {moves} shards moving" if moves else ""
                ) + ("" if joined else ", joining")
                if led < len(groups) or moves or not joined or not groups:
                    ready = False
            if live:
                live.update(_status_table(rows))
            if ready:
                return removed
            time.sleep(0.1)
        waiting = "; ".join(f"node {nid}: {row}" for nid, row in sorted(rows.items()))
        raise TimeoutError(f"{failure} in {timeout}s ({waiting})")
    finally:
        if live:
            live.stop()


def cluster_up(
    data_dir: Path,
    nodes: int,
    base_port: int,
    *,
    host: str = "127.0.0.1",
    timeout: float = 60.0,
    console: Console | None = None,
    env: dict | None = None,
    **settings: Any,
) -> ClusterConfig:
    """Start (or restart, or grow) the cluster in data_dir; raise TimeoutError if not ready."""
    data_dir.mkdir(parents=True, exist_ok=True)
    config = load_config(data_dir)
    if config is None:
        ids = list(range(1, nodes + 1))
        # settings: the other ClusterConfig fields (partitions, replicas, state, ...).
        config = ClusterConfig(
            nodes={i: f"{host}:{base_port + i - 1}" for i in ids}, initial=ids, **settings
        )
        config.formed = _nodes_ran(config, data_dir)  # made again over its nodes: it was lost
    else:
        # Growing: new ids join the existing cluster; their ports continue the sequence.
        while len(config.active()) < nodes:
            node_id = max(config.nodes) + 1
            config.nodes[node_id] = f"{host}:{base_port + node_id - 1}"
    # New, from before cluster ids, or made again over its nodes' directories (cluster.json
    # lost): the id they record, if any does.
    config.cluster_id = config.cluster_id or _recorded_cluster_id(config, data_dir) or new_cluster_id()
    save_config(data_dir, config)
    existing = config.formed
    alive = running_nodes(config, data_dir)
    started = {
        node_id: start_node(config, node_id, data_dir, env=env, existing=existing)
        for node_id in sorted(config.active()) if node_id not in alive
    }
    removed = wait_until_ready(
        config, timeout, console, data_dir,
        failure=f"the cluster in {data_dir} did not elect every leader", started=started,
    )
    for node_id in sorted(removed):
        _forget_removed_node(config, node_id, data_dir, console)
    if not config.formed:
        config.formed = True
        save_config(data_dir, config)
    return config


def _forget_removed_node(config: ClusterConfig, node_id: int, data_dir: Path,
                         console: Console | None) -> None:
    """Record a node the cluster took out while it was down, and stop its idle process."""
    config.removed.append(node_id)
    save_config(data_dir, config)
    _stop_node(data_dir, node_id, time.monotonic() + 10.0)
    if console is not None:
        console.print(f"node {node_id} was taken out of the cluster while it was down "
                      "(it stays out; start it with an empty data dir to add it again)")


async def _meta_members(addresses: list[str], timeout: float) -> dict:
    router = Router(addresses, timeout=timeout)
    try:
        return await router.call(META_GROUP, MEMBERS, [META_GROUP])
    finally:
        await router.close()


def fetch_meta_members(addresses: list[str], timeout: float = 5.0) -> dict:
    """The metadata group as its leader reports it: {leader, voters, learners, commit, match}."""
    return asyncio.run(_meta_members(addresses, timeout))


def _wait_out_of_meta(addresses: list[str], node_id: int, deadline: float) -> bool:
    """Wait until the metadata group no longer counts ``node_id`` (voter or learner)."""
    while time.monotonic() < deadline:
        try:
            members = fetch_meta_members(addresses, timeout=min(5.0, max(0.1, deadline - time.monotonic())))
        except Error:
            members = None  # no leader right now (an election, a leadership transfer)
        if members is not None and node_id not in {*members["voters"], *members["learners"]}:
            return True
        time.sleep(0.1)
    return False


def cluster_remove(data_dir: Path, node_id: int, *, timeout: float = 120.0,
                   console: Console | None = None) -> None:
    """Take a node out: its shards move to the others (Raft membership changes), then it stops."""
    config = load_config(data_dir)
    if config is None or node_id not in config.active():
        raise InvalidArgument(f"node {node_id} is not an active node of the cluster in {data_dir}")
    others = [a for n, a in config.active().items() if n != node_id]
    request_leave(others, node_id)
    config.removed.append(node_id)
    save_config(data_dir, config)
    remaining = ClusterConfig(
        nodes={n: a for n, a in config.nodes.items()}, partitions=config.partitions,
        replicas=config.replicas, vnodes=config.vnodes, initial=config.initial,
        state=config.state, removed=config.removed, reads=config.reads,
    )
    wait_until_ready(remaining, timeout, console, data_dir,
                     failure=f"the shards of node {node_id} did not move away")
    deadline = time.monotonic() + timeout
    # The metadata group follows the map too: stop the node only once the group no longer
    # counts it, or removing founders one after the other would leave it without a quorum.
    if not _wait_out_of_meta(others, node_id, deadline):
        raise TimeoutError(f"the metadata group still counts node {node_id} after {timeout}s")
    address = config.nodes[node_id]
    while time.monotonic() < deadline:  # the node hosts nothing any more
        try:
            if not fetch_status(address, timeout=1.0)["groups"]:
                break
        except Exception:  # noqa: BLE001 - already gone
            break
        time.sleep(0.1)
    _stop_node(data_dir, node_id, deadline)


def _stop_node(data_dir: Path, node_id: int, deadline: float) -> None:
    """SIGTERM a node that is no longer a member, wait (until deadline) for it to exit, and
    forget its pid."""
    pid = read_pid(data_dir, node_id)
    if pid is not None and pid_alive(pid):
        _terminate(pid)
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(0.05)
    pid_path(data_dir, node_id).unlink(missing_ok=True)


def cluster_down(data_dir: Path, timeout: float = 10.0) -> tuple[list[int], list[int]]:
    """Stop every node (SIGTERM, then SIGKILL after timeout): the ids that were running, and
    those of them that had to be killed."""
    config = load_config(data_dir)
    if config is None:
        return [], []
    alive = running_nodes(config, data_dir, include_removed=True)
    for pid in alive.values():
        _terminate(pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(pid_alive(p) for p in alive.values()):
        time.sleep(0.05)
    killed = sorted(node_id for node_id, pid in alive.items() if pid_alive(pid))
    for node_id in killed:
        _signal_group(alive[node_id], signal.SIGKILL)
    for node_id in alive:
        pid_path(data_dir, node_id).unlink(missing_ok=True)
    return sorted(alive), killed


def _terminate(pid: int) -> None:
    # SIGCONT after SIGTERM: a node paused by SIGSTOP (a debugger, a test) gets to shut down
    # cleanly instead of being killed at the timeout.
    _signal_group(pid, signal.SIGTERM)
    _signal_group(pid, signal.SIGCONT)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _at_least(minimum: float, cast: type) -> Any:
    """An argparse type: ``cast`` of the text, refused below ``minimum`` with a clear error."""

    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {text}")
        return value

    return parse


def add_node_arguments(parser: argparse.ArgumentParser) -> None:
    """The node options that `pykv serve` and `cluster up` share (Raft log traffic, 2PC)."""
    # A frame must hold a Raft message carrying one entry with the largest value (1 MiB).
    parser.add_argument("--max-frame-mb", type=_at_least(2.0, float), default=DEFAULT_MAX_FRAME_MB,
                        help="the largest frame a node sends or accepts (MiB); snapshots travel "
                             "in chunks of at most half of it")
    parser.add_argument("--snapshot-every", type=_at_least(1, int), default=None, metavar="ENTRIES",
                        help="applied entries between two snapshots of a group (default: a "
                             "share of the node's log budget)")
    parser.add_argument("--recovery-after", type=_at_least(1.0, float), default=DEFAULT_RECOVERY_AFTER,
                        metavar="SECONDS",
                        help="how long a prepared transaction waits for its decision before its "
                             "shard settles it with the coordinator shard (default "
                             f"{DEFAULT_RECOVERY_AFTER:g}); at once when its client's "
                             "connection closed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    up = sub.add_parser("up", help="start N nodes (or restart the missing ones) and wait for leaders")
    up.add_argument("--nodes", type=_at_least(1, int), default=3)
    up.add_argument("--data-dir", required=True, type=Path)
    up.add_argument("--base-port", type=_at_least(1, int), default=7401,
                    help="node N listens on BASE_PORT + N - 1 (all of them at most 65535)")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--partitions", type=_at_least(1, int), default=DEFAULT_PARTITIONS, help=PARTITIONS_HELP)
    up.add_argument("--replicas", type=_at_least(1, int), default=DEFAULT_REPLICAS)
    up.add_argument("--vnodes", type=_at_least(1, int), default=DEFAULT_VNODES)
    up.add_argument("--state", choices=["storage", "memory"], default="storage",
                    help="shard values on disk (pykv.storage; default) or in memory with snapshots")
    up.add_argument("--reads", choices=["safe", "lease"], default="safe",
                    help="safe: ReadIndex, a heartbeat round per batch of reads (default); "
                         "lease: no round trip, linearizable only under bounded clock drift")
    up.add_argument("--dead-after", type=float, default=DEFAULT_DEAD_AFTER, metavar="SECONDS",
                    help=DEAD_AFTER_HELP)
    up.add_argument("--cache-mb", type=float, default=64.0,
                    help="each node's read cache of shard values, shared by its shards (MiB)")
    add_node_arguments(up)
    up.add_argument("--timeout", type=float, default=60.0)
    down = sub.add_parser("down", help="stop every node of the cluster in DIR")
    down.add_argument("--data-dir", required=True, type=Path)
    remove = sub.add_parser("remove", help="move a node's shards to the others, then stop it")
    remove.add_argument("--data-dir", required=True, type=Path)
    remove.add_argument("--node", type=int, required=True)
    remove.add_argument("--timeout", type=float, default=120.0)


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    try:
        return _run(args, console)
    except CorruptData as exc:  # cluster.json
        console.print(f"[red]{exc}[/red]")
        return 2


def _run(args: argparse.Namespace, console: Console) -> int:
    if args.action == "down":
        stopped, killed = cluster_down(args.data_dir)
        console.print(f"stopped nodes {stopped}" if stopped else "no node was running")
        if killed:
            console.print(f"killed nodes {killed}: they did not stop within 10 s of SIGTERM")
        return 0
    if args.action == "remove":
        try:
            cluster_remove(args.data_dir, args.node, timeout=args.timeout, console=console)
        except (ValueError, TimeoutError, Error) as exc:
            console.print(f"[red]{exc}[/red]")
            return 1
        console.print(f"node {args.node} removed; its shards live on the other nodes")
        config = load_config(args.data_dir)
        if config is not None:
            _print_tolerance(config, console)
        return 0
    if args.base_port + args.nodes - 1 > 65535:
        console.print(f"[red]--base-port {args.base_port} leaves no port for node {args.nodes}: "
                      f"ports end at 65535[/red]")
        return 2
    try:
        config = cluster_up(
            args.data_dir,
            args.nodes,
            args.base_port,
            partitions=args.partitions,
            replicas=args.replicas,
            vnodes=args.vnodes,
            host=args.host,
            state=args.state,
            reads=args.reads,
            dead_after=args.dead_after,
            cache_mb=args.cache_mb,
            max_frame_mb=args.max_frame_mb,
            snapshot_every=args.snapshot_every,
            recovery_after=args.recovery_after,
            timeout=args.timeout,
            console=console,
        )
    except TimeoutError as exc:
        console.print(f"[red]{exc}[/red]; see the node-*.log files in {args.data_dir}")
        return 1
    addrs = " ".join(config.nodes[n] for n in sorted(config.nodes))
    console.print(f"cluster ready: {addrs}")
    _print_tolerance(config, console)
    return 0


def _print_tolerance(config: ClusterConfig, console: Console) -> None:
    """How many replicas each shard has and how many failures it survives (a majority must
    stay): in yellow when it survives none."""
    nodes = len(config.active())
    replicas = min(config.replicas, nodes)
    survives = (replicas - 1) // 2
    line = (f"{nodes} nodes, {config.replicas} replicas asked: each shard has {replicas} and "
            f"survives {survives} failed node{'s' if survives != 1 else ''}")
    console.print(line if survives else f"[yellow]{line}[/yellow]")
