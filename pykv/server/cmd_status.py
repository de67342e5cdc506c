"""`pykv status`: a table of every node and shard (role, leader, term, commit, applied, lag,
prepared transactions), and one of every node (its WAL, read cache and snapshots)."""

from __future__ import annotations

import argparse
import json
import re

from rich.console import Console
from rich.table import Table

from pykv.client.admin import fetch_any_shard_map, fetch_statuses
from pykv.server.cli import add_addresses_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_addresses_argument(parser, required=True)
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--json", action="store_true", help="print the raw status as JSON")


def discover(addresses: list[str], timeout: float) -> dict[str, int | None]:
    """The given addresses plus every member of the ring the shard map of the first answering
    one names (not nodes taken out), so that `pykv status --addresses ONE` shows the whole
    cluster: address -> node id (None for an address the map does not name)."""
    everyone: dict[str, int | None] = dict.fromkeys(addresses)
    shard_map = fetch_any_shard_map(addresses, timeout=timeout)  # none: collect() reports them down
    if shard_map is not None:
        members = {str(n) for n in shard_map.get("members", shard_map["nodes"])}  # not removed ones
        nodes = {n: a for n, a in shard_map["nodes"].items() if n in members}
        everyone.update((a, int(n)) for n, a in sorted(nodes.items(), key=lambda kv: int(kv[0])))
    return everyone


def collect(addresses: list[str], timeout: float) -> dict[str, dict | str]:
    """address -> the node's status, or the error text when it did not answer (its node id
    first, when the shard map names it: "node 2: Unavailable: ..."). Every node is asked at
    once: a paused or cut-off node costs the timeout once."""
    found: dict[str, dict | str] = {}
    known = discover(addresses, timeout)
    for address, status in fetch_statuses(list(known), timeout=timeout).items():
        if isinstance(status, dict):
            found[address] = status
            continue
        said = f"{type(status).__name__}: {status}"
        found[address] = said if known[address] is None else f"node {known[address]}: {said}"
    return found


def _groups(status: dict) -> list[tuple[str, dict]]:
    """(shard, group status) of a node in shard order, then its metadata replica as "meta"."""
    rows = sorted(status["groups"].items(), key=lambda kv: int(kv[0]))
    if status.get("meta"):
        rows.append(("meta", status["meta"]))
    return rows


# Errors of a node that took the connection and then said nothing: paused, overloaded or cut
# off, and likely back soon; any other error (a refused connection) means the node is down.
SILENT_ERRORS = ("NotAnswering", "Timeout")


def _down_node(status: str) -> tuple[str, str, str]:
    """(node id or "?", state, error) of a node that did not answer, from collect()'s text;
    state is "not answering" (it took the connection) or "down"."""
    match = re.fullmatch(r"node (\d+): (.*)", status, re.DOTALL)
    node, said = (match[1], match[2]) if match else ("?", status)
    return node, "not answering" if said.startswith(SILENT_ERRORS) else "down", said


def build_table(statuses: dict[str, dict | str]) -> Table:
    # Lag of a replica = the highest commit index any replica of the shard reports - its applied.
    best_commit: dict[str, int] = {}
    for status in statuses.values():
        if isinstance(status, dict):
            for shard, group in _groups(status):
                best_commit[shard] = max(best_commit.get(shard, 0), group["commit"])
    table = Table(title="pykv status")
    # prepared: transactions holding locks on the replica, waiting for their decision;
    # unfinished: commits it coordinated that some participant has not applied yet.
    columns = ("node", "address", "shard", "role", "leader", "term", "commit", "applied", "lag",
               "prepared", "unfinished", "keys")
    for column in columns:
        table.add_column(column, justify="right" if column not in ("address", "role") else "left")
    for address, status in statuses.items():
        if not isinstance(status, dict):
            node, state, said = _down_node(status)
            table.add_row(node, address, "-", f"[red]{state}[/red] ({said})", *["-"] * (len(columns) - 4))
            continue
        for shard, group in _groups(status):
            role = group["role"] + (" (quiesced)" if group.get("quiesced") else "")
            role += " (restoring)" if group.get("restoring") else ""
            style = "bold green" if group["role"] == "leader" else ""
            table.add_row(
                str(status["node_id"]), address, shard,
                f"[{style}]{role}[/{style}]" if style else role,
                str(group["leader"]), str(group["term"]), str(group["commit"]),
                str(group["applied"]), str(best_commit[shard] - group["applied"]),
                str(group.get("prepared", 0)), str(group.get("unfinished", 0)), str(group["keys"]),
            )
    return table


def build_node_table(statuses: dict[str, dict | str]) -> Table:
    """One row per node that answered: its memory, what its WAL holds, its read cache, its
    snapshots, the exports being read from it (backups, busy scans), and how long its driver
    held the event loop (every request waits meanwhile)."""
    clusters = sorted({str(s.get("cluster_id")) for s in statuses.values() if isinstance(s, dict)})
    title = "pykv nodes" + (f" of cluster {clusters[0]}" if len(clusters) == 1 else "")
    if len(clusters) > 1:  # addresses of two clusters given together
        title += f" [red]of {len(clusters)} different clusters: {', '.join(clusters)}[/red]"
    table = Table(title=title)
    columns = ("node", "address", "pid", "map", "RSS MB", "WAL MB", "WAL segments", "cache MB",
               "cache hits", "snapshots sent", "snapshots received", "exports", "longest step ms",
               "steps > 50 ms")
    for column in columns:
        table.add_column(column, justify="left" if column == "address" else "right")
    for address, status in statuses.items():
        if not isinstance(status, dict):
            continue
        wal = status.get("wal") or {}
        cache = status.get("cache")
        if cache:
            lookups = cache["hits"] + cache["misses"]
            cache_mb = f"{cache['bytes'] / 1e6:.1f} / {cache['capacity_bytes'] / 1e6:.0f}"
            hits = f"{cache['hits'] / lookups:.1%}" if lookups else "-"
        else:
            cache_mb = hits = "-"  # values in memory: no cache
        snapshots = status.get("snapshots", {})
        driver = status.get("driver", {})
        rss = status.get("rss_bytes")
        table.add_row(
            str(status["node_id"]), address, str(status.get("pid", "-")), str(status.get("map_version", "-")),
            "-" if rss is None else f"{rss / 1e6:.0f}",
            f"{wal.get('bytes', 0) / 1e6:.1f}", str(wal.get("segments", "-")), cache_mb, hits,
            str(snapshots.get("sent", 0)), str(snapshots.get("received", 0)), str(status.get("exports", "-")),
            str(driver.get("max_ms", "-")), str(driver.get("over_50ms", "-")),
        )
    return table


def run(args: argparse.Namespace) -> int:
    statuses = collect(args.addresses, args.timeout)
    if args.json:
        print(json.dumps(statuses, indent=2, sort_keys=True))
    else:
        console = Console()
        if not console.is_terminal:
            console = Console(width=160)
        console.print(build_table(statuses))
        console.print(build_node_table(statuses))
        for warning in warnings(statuses):
            console.print(f"[bold red]{warning}[/bold red]")
    return 0 if all(isinstance(s, dict) for s in statuses.values()) else 1


def warnings(statuses: dict[str, dict | str]) -> list[str]:
    """What an operator must act on, one line each: followers a leader on some node found
    holding less than they had acknowledged (a node restored from an older copy of its
    directory, a disk that lost writes)."""
    said = []
    for address, status in statuses.items():
        lost = status.get("counters", {}).get("followers_behind_their_acks", 0) if isinstance(status, dict) else 0
        if lost:
            said.append(
                f"node {status['node_id']} ({address}) found {lost} time(s) a follower holding less than it "
                "had acknowledged (event=follower_lost_entries in its log: which node, which shard); "
                "such a node may have voted twice in a term: to be sure, stop it, remove its data "
                "directory and start it again (it rejoins as a new replica)"
            )
    return said
