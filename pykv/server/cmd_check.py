"""`pykv check DIR`: read and decode every value of an embedded store (or of a stopped cluster
node's shard replicas), and list the damaged.

A value fails when its bytes no longer match their checksum (the disk changed them) or do not
decode (written wrongly). The store opens as usual (its WAL is checked then), so a store
open in another process cannot be checked (StoreLocked). Exit status: 0 when every value
reads back, 1 when some do not, 2 when the store cannot be opened. A damaged key can be
deleted or written again: neither reads its old value. On a node, a damaged replica is
rebuilt from the others: remove the node's data directory and start it again.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

import pykv
from pykv.embedded import CheckReport, EmbeddedBackend
from pykv.errors import Error
from pykv.replica.stored import check_shards
from pykv.server.progressbar import with_progress
from pykv.storage.files import DirectoryLock

# Damaged keys listed in the table (all of them with --json).
SHOWN = 50


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="the embedded store's directory")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object: keys read and every damaged key with why")


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    report = open_and_check(args.path, console, quiet=args.json)
    if report is None:
        return 2
    if args.json:
        print(json.dumps({"keys": report.keys, "damaged": damaged_as_json(report)}))
    else:
        print_report(report, console)
    return 1 if report.damaged else 0


def open_and_check(path: Path, console: Console, *, quiet: bool) -> CheckReport | None:
    """Open the store in path and read every value (a progress bar unless quiet); None, with
    the reason printed, when it cannot be opened. A node's data directory (it has shards/)
    is checked shard by shard, while the node is stopped."""
    if not path.is_dir():
        console.print(f"[red]{path} is not a store's directory[/red]")
        return None
    try:
        if (path / "shards").is_dir():
            return _check_node(path, console, quiet=quiet)
        db = pykv.open(path, read_only=True)  # a check changes nothing, not even a torn tail
    except (Error, OSError) as exc:  # OSError: a path that cannot be written or read
        console.print(f"[red]cannot open {path}: {type(exc).__name__}: {exc}[/red]")
        return None
    try:
        backend = db.backend
        assert isinstance(backend, EmbeddedBackend)
        total = backend.storage.stats()["keys"]
        return with_progress("checking", backend.check, console, quiet=quiet, total=total)
    finally:
        db.close()


def _check_node(path: Path, console: Console, *, quiet: bool) -> CheckReport:
    lock = DirectoryLock(str(path))  # StoreLocked while the node runs: stop it first
    try:
        return with_progress("checking", lambda report: check_shards(path / "shards", report),
                             console, quiet=quiet)
    finally:
        lock.release()


def damaged_as_json(report: CheckReport) -> list[dict]:
    return [{"key": k, "error": e} for k, e in report.damaged]


def print_report(report: CheckReport, console: Console) -> None:
    if not report.damaged:
        console.print(f"{report.keys:,} values read back: none is damaged")
        return
    table = Table(title=f"pykv check: {len(report.damaged):,} of {report.keys:,} values damaged")
    table.add_column("key")
    table.add_column("error")
    for key, error in report.damaged[:SHOWN]:
        table.add_row(key, error)
    console.print(table)
    if len(report.damaged) > SHOWN:
        console.print(f"... and {len(report.damaged) - SHOWN:,} more (--json lists them all)")
