"""`pykv backup DIR NEW_DIR` and `pykv backup NEW_DIR --addresses HOST:PORT`: copy a store, verified.

An embedded store that no process has open is copied as ``db.backup()`` copies it (one
consistent state: a fresh hint, then the WAL up to that moment). A store another process has
open is backed up by that process, with ``db.backup(path)``, while it keeps serving. A
cluster is copied, while it serves, into a new embedded store holding every key as of one
moment (``KeyValueStore.backup`` of a cluster client). The copy is then opened and counted.
Exit status: 0 when the copy opens, 2 otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

import pykv
from pykv.errors import Error, StoreLocked
from pykv.server.cli import add_addresses_argument
from pykv.server.cmd_kv import trailing_positional
from pykv.server.progressbar import with_progress


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", type=Path, nargs="*", metavar="DIR",
                        help="the store's directory, then a new (or empty) directory for the copy "
                             "(with --addresses: only the new one)")
    add_addresses_argument(parser, help="back up the cluster at these addresses (any of its nodes)")


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    if args.addresses and not args.paths and (reclaimed := trailing_positional(args.addresses)):
        args.paths = [Path(reclaimed)]  # `--addresses A NEW_DIR`
    wanted = 1 if args.addresses else 2
    if len(args.paths) != wanted:
        console.print("[red]give DIR NEW_DIR, or NEW_DIR --addresses HOST:PORT ...[/red]")
        return 2
    target = args.paths[-1]
    source = " ".join(args.addresses) if args.addresses else str(args.paths[0])
    if not args.addresses and not (args.paths[0] / "wal").is_dir():
        console.print(f"[red]{source} is not a store's directory[/red]")
        return 2
    try:
        if args.addresses:
            _copy_cluster(args.addresses, target, console)
        else:
            _copy(args.paths[0], target, console)
        with pykv.open(target, read_only=True) as copy:
            keys = copy.backend.stats()["keys"]
    except StoreLocked as exc:
        console.print(f"[red]{exc}.[/red] A process that has the store open backs it up itself, "
                      "while it serves: db.backup(path)")
        return 2
    except (Error, OSError) as exc:  # OSError: a path that cannot be written or read
        console.print(f"[red]cannot back up {source}: {type(exc).__name__}: {exc}[/red]")
        return 2
    console.print(f"{target}: a copy of {source} holding {keys:,} keys; it opens")
    return 0


def _copy(path: Path, target: Path, console: Console) -> None:
    with pykv.open(path, read_only=True) as db:  # the source stays as it is
        with_progress("copying", lambda progress: db.backup(target, progress), console, in_bytes=True)


def _copy_cluster(addresses: list[str], target: Path, console: Console) -> None:
    with pykv.connect(addresses) as db:
        with_progress("shards copied", lambda progress: db.backup(target, progress), console)
