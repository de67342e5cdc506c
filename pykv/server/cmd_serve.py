"""`pykv serve`: run one cluster node in the foreground (uvloop) until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
from pathlib import Path

from pykv.errors import InvalidArgument
from pykv.server.cmd_cluster import (
    DEAD_AFTER_HELP,
    DEFAULT_DEAD_AFTER,
    DEFAULT_PARTITIONS,
    PARTITIONS_HELP,
    add_node_arguments,
)
from pykv.server.identity import check_cluster_id
from pykv.server.node import NodeConfig, log_start_failure, serve_forever

# The soft limit asked for when the hard one is infinite (the kernel's nr_open caps it).
MAX_OPEN_FILES = 1 << 20


def parse_peers(text: str) -> dict[int, str]:
    """``1=127.0.0.1:7401,2=127.0.0.1:7402`` -> {1: "127.0.0.1:7401", 2: ...}."""
    peers = {}
    for item in text.replace(" ", ",").split(","):
        if not item:
            continue
        node_id, sep, address = item.partition("=")
        if not sep or not node_id.strip().isdigit() or int(node_id) < 1:
            raise argparse.ArgumentTypeError(f"a peer must be ID=HOST:PORT with ID >= 1, not {item!r}")
        peers[int(node_id)] = address.strip()
    return peers


def _node_id(text: str) -> int:
    # 0 is no node: Raft and the clocks read it as "none".
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a node id is a positive int, not {text!r}")
    return int(text)


def _cluster_id(text: str) -> str:
    try:
        return check_cluster_id(text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--id", type=_node_id, required=True, help="this node's id (a positive int)")
    parser.add_argument("--listen", default="127.0.0.1:7401", help="HOST:PORT to bind")
    parser.add_argument("--peers", type=parse_peers, default={},
                        help="every node of the cluster as ID=HOST:PORT,... (this one included)")
    parser.add_argument("--initial", default="",
                        help="comma-separated ids of the founding members (default: all peers)")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--cluster-id", type=_cluster_id, default=None,
                        help="the cluster this node belongs to (`cluster up` makes one); a peer "
                             "of another cluster is refused, and so is a data directory first "
                             "started under another. Default: the one the data directory "
                             "records, or for a new one an id derived from the founding "
                             "members and their addresses")
    parser.add_argument("--existing", action="store_true",
                        help="the cluster exists already (`cluster up` passes it on a restart): "
                             "an empty --data-dir then means this node lost its data, and it "
                             "rejoins its groups as a new replica instead of founding them again"),
    parser.add_argument("--partitions", type=int, default=DEFAULT_PARTITIONS, help=PARTITIONS_HELP)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--vnodes", type=int, default=64)
    parser.add_argument("--tick-ms", type=float, default=10.0)
    parser.add_argument("--election-ticks", type=int, default=40)
    parser.add_argument("--heartbeat-ticks", type=int, default=10)
    parser.add_argument("--batch-wait-ms", type=float, default=0.0,
                        help="pause between driver batches to make bigger ones (default 0)")
    parser.add_argument("--state", choices=["storage", "memory"], default="storage",
                        help="shard values on disk (pykv.storage; the default) or in memory with snapshots")
    parser.add_argument("--cache-mb", type=float, default=64.0,
                        help="read cache of shard values, shared by all the node's shards "
                             "(MiB, default 64)")
    parser.add_argument("--fsync", choices=["always", "interval", "off"], default="always")
    parser.add_argument("--reads", choices=["safe", "lease"], default="safe",
                        help="safe: ReadIndex, a heartbeat round per batch of reads (the default); "
                             "lease: no round trip, linearizable only under bounded clock drift")
    parser.add_argument("--dead-after", type=float, default=DEFAULT_DEAD_AFTER, metavar="SECONDS",
                        help=DEAD_AFTER_HELP)
    add_node_arguments(parser)
    parser.add_argument("--log-level", default="INFO")


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    """The node's configuration; InvalidArgument for options that cannot make a cluster."""
    peers = dict(args.peers)
    peers.setdefault(args.id, args.listen)
    try:
        initial = [int(x) for x in args.initial.split(",") if x.strip()] or sorted(peers)
    except ValueError:
        raise InvalidArgument(f"--initial is a comma-separated list of ids, not {args.initial!r}") from None
    unknown = sorted(set(initial) - set(peers))
    if unknown:
        # Founded with a member nobody can reach, a group could never elect a leader.
        raise InvalidArgument(f"--initial names nodes {unknown} that --peers gives no address")
    return NodeConfig(
        node_id=args.id,
        listen=args.listen,
        peers=peers,
        data_dir=args.data_dir,
        initial=initial,
        partitions=args.partitions,
        replicas=args.replicas,
        vnodes=args.vnodes,
        tick_ms=args.tick_ms,
        election_ticks=args.election_ticks,
        heartbeat_ticks=args.heartbeat_ticks,
        fsync=args.fsync,
        batch_wait=args.batch_wait_ms / 1000.0,
        state=args.state,
        reads=args.reads,
        dead_after=args.dead_after,
        cache_bytes=int(args.cache_mb * (1 << 20)),
        max_frame=int(args.max_frame_mb * (1 << 20)),
        snapshot_every=args.snapshot_every,
        recovery_after=args.recovery_after,
        existing=args.existing,
        cluster_id=args.cluster_id,
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format=f"%(asctime)s node{args.id} %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = config_from_args(args)
    except InvalidArgument as exc:
        log_start_failure(args.id, exc)
        return 2
    raise_open_files_limit()
    # PYKV_PROFILE=DIR: profile this node with cProfile, written to DIR/node-ID.prof at exit.
    profile_dir = os.environ.get("PYKV_PROFILE")
    profiler = None
    if profile_dir:
        import cProfile
        import time

        profiler = cProfile.Profile(time.process_time)  # CPU time: not time spent preempted
        profiler.enable()
    try:
        _run_loop(config)
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(os.path.join(profile_dir, f"node-{args.id}.prof"))
    return 0


def raise_open_files_limit() -> None:
    """Lift the soft limit on open files to the hard one: a node holds a descriptor per
    client and peer connection and per open segment of its shards, and the common soft limit
    (1024) is reached long before the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):  # an infinite hard limit the kernel caps lower
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, MAX_OPEN_FILES), hard))


def _run_loop(config: NodeConfig) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve_forever(config))
        return
    uvloop.run(serve_forever(config))
