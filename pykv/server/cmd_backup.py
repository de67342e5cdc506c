"""`pykv backup DIR NEW_DIR`: copy an embedded store that no process has open, verified.

The copy is made as ``db.backup()`` makes it (one consistent state: a fresh hint, then the
WAL up to that moment), then opened and counted. A store another process has open is backed
up by that process, with ``db.backup(path)``, while it keeps serving. Exit status: 0 when the
copy opens, 2 otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

import pykv
from pykv.errors import Error, StoreLocked
from pykv.server.progressbar import with_progress


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="the store's directory")
    parser.add_argument("target", type=Path, help="a new (or empty) directory for the copy")


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    if not (args.path / "wal").is_dir():
        console.print(f"[red]{args.path} is not a store's directory[/red]")
        return 2
    try:
        _copy(args.path, args.target, console)
        with pykv.open(args.target) as copy:
            keys = copy.backend.stats()["keys"]
    except StoreLocked as exc:
        console.print(f"[red]{exc}.[/red] A process that has the store open backs it up itself, "
                      "while it serves: db.backup(path)")
        return 2
    except Error as exc:
        console.print(f"[red]cannot back up {args.path}: {type(exc).__name__}: {exc}[/red]")
        return 2
    console.print(f"{args.target}: a copy of {args.path} holding {keys:,} keys; it opens")
    return 0


def _copy(path: Path, target: Path, console: Console) -> None:
    with pykv.open(path) as db:
        with_progress("copying", lambda progress: db.backup(target, progress), console, in_bytes=True)
