"""`pykv restore BACKUP_DIR --addresses HOST:PORT`: load a backup (an embedded store) into a cluster.

Every live key of the backup (what `pykv backup` writes, or any embedded store) is loaded
into the cluster with its vector clock and timestamp (AsyncCluster.load), several batches at
once, in key order, under a progress bar: the clocks clients kept from before the backup
(``get_versioned``, ``put(..., context=clock)``) still match the restored versions. The
cluster must hold no key, unless ``--overwrite``: then the backup's keys replace the
cluster's (with clocks after both, so that no context from before matches them) and its
other keys stay (that is how a restore that stopped part way is finished; a batch loaded
twice is loaded once). The resolvers a cluster backup kept (RESOLVERS) are registered
first. Exit status: 0 once every key is written, 2 otherwise.
"""

from __future__ import annotations

import argparse
import itertools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console

import pykv
from pykv.api import KeyValueStore
from pykv.codec import size_bound
from pykv.embedded import kept_resolvers
from pykv.errors import Error
from pykv.replica.shard import bounded_runs
from pykv.server.cli import add_addresses_argument
from pykv.server.cmd_kv import trailing_positional
from pykv.server.progressbar import Report, with_progress
from pykv.txn.model import Versioned

# Keys (and bytes, about) per batch of versions loaded, and batches in flight at once.
BATCH_KEYS = 500
BATCH_BYTES = 4 << 20
IN_FLIGHT = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, nargs="?", help="the backup: an embedded store's directory")
    add_addresses_argument(parser, required=True)
    parser.add_argument("--overwrite", action="store_true",
                        help="load into a cluster that holds keys (finish a restore that stopped)")


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    if args.path is None and (reclaimed := trailing_positional(args.addresses)):
        args.path = Path(reclaimed)  # `--addresses A BACKUP_DIR`
    if args.path is None or not (args.path / "wal").is_dir():
        console.print(f"[red]{args.path or 'BACKUP_DIR'} is not a store's directory[/red] "
                      "(pykv restore BACKUP_DIR --addresses HOST:PORT)")
        return 2
    source = " ".join(args.addresses)
    try:
        with pykv.open(args.path, read_only=True) as backup, pykv.connect(args.addresses) as cluster:
            held = next(iter(cluster.scan(limit=1, consistent=False)), None)
            if held is not None and not args.overwrite:
                console.print(f"[red]the cluster at {source} holds keys ({held[0]!r}, ...)[/red]: "
                              "restore loads a backup into an empty cluster; --overwrite writes "
                              "the backup's keys over the cluster's and keeps its others")
                return 2
            resolvers = kept_resolvers(args.path)
            for prefix, name in sorted(resolvers.items()):
                cluster.register_resolver(prefix, name)
            total = backup.backend.stats()["keys"]
            restored = with_progress(
                "keys restored", lambda report: restore(backup, cluster, report), console, total=total
            )
    except (Error, OSError) as exc:  # OSError: a path that cannot be written or read
        console.print(f"[red]cannot restore {args.path}: {type(exc).__name__}: {exc}[/red]")
        return 2
    registered = ", ".join(f"{prefix!r}: {name}" for prefix, name in sorted(resolvers.items()))
    console.print(f"restored {restored:,} keys of {args.path} into the cluster at {source}"
                  + (f", and its resolvers ({registered})" if resolvers else ""))
    return 0


def restore(backup: KeyValueStore, cluster: KeyValueStore, report: Report | None = None) -> int:
    """Load every live key of ``backup`` into ``cluster``, clocks and timestamps kept (batches
    of versions, IN_FLIGHT at once); ``report(keys done)`` as they land. Returns the keys loaded."""
    done = 0
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        versions = backup.backend.scan("", None, None, None)
        batches = bounded_runs(versions, item_bytes, BATCH_KEYS, BATCH_BYTES)
        while wave := list(itertools.islice(batches, IN_FLIGHT)):
            list(pool.map(cluster.backend.load, wave))  # (raises the first batch's error)
            done += sum(len(batch) for batch in wave)
            if report is not None:
                report(done)
    return done


def item_bytes(item: tuple[str, Versioned]) -> int:
    """About what one version takes in a batch (key, clock and value), for BATCH_BYTES."""
    return len(item[0]) + len(item[1].clock) + size_bound(item[1].value)
