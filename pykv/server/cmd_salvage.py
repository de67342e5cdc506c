"""`pykv salvage DIR NEW_DIR`: copy an embedded store that refuses to open (damage in the middle
of its WAL) into a new directory that opens, and say what was lost.

Each damaged WAL record of the copy becomes a filler record (pykv.storage.salvage): the
transactions it held are lost, every other one is kept. The copy is then opened and every
value read back, as `pykv check` does. DIR is only read. Exit status: 0 when nothing was lost
(the store needed no salvage), 1 when the copy opens but records or values were lost (listed),
2 when no copy could be made that opens.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pykv.errors import Error
from pykv.server.cmd_check import damaged_as_json, open_and_check, print_report
from pykv.server.progressbar import with_progress
from pykv.storage.salvage import SalvageReport, salvage


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="the damaged store's directory (only read)")
    parser.add_argument("target", type=Path, help="a new directory for the salvaged copy")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object: the damaged records and the damaged values")


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    try:
        report = with_progress("salvaging", lambda progress: salvage(args.path, args.target, progress),
                               console, quiet=args.json)
    except (Error, OSError) as exc:  # OSError: a path that cannot be written or read
        console.print(f"[red]cannot salvage {args.path}: {type(exc).__name__}: {exc}[/red]")
        return 2
    check = open_and_check(args.target, console, quiet=args.json)
    if check is None:
        return 2
    if args.json:
        print(json.dumps({**asdict(report), "lost_records": report.lost_records,
                          "keys": check.keys, "damaged_values": damaged_as_json(check)}))
    else:
        _print_salvage(report, args.target, console)
        print_report(check, console)
    return 1 if report.damaged or check.damaged else 0


def _print_salvage(report: SalvageReport, target: Path, console: Console) -> None:
    console.print(f"{report.segments:,} WAL segments, {report.records:,} records kept in {target}")
    if report.headers_rewritten:
        console.print(f"segment headers rewritten from their names: {report.headers_rewritten}")
    if report.hint_dropped:
        console.print("the hint file was damaged and is dropped: opening replays the whole WAL")
    if not report.damaged:
        console.print("no damaged record")
        return
    table = Table(title=f"pykv salvage: {report.lost_records:,} damaged records replaced (their "
                        "transactions are lost)")
    for column in ("segment", "bytes", "first lsn", "records"):
        table.add_column(column, justify="right")
    for span in report.damaged:
        table.add_row(str(span.segment), f"{span.start}-{span.stop}", str(span.first_lsn), str(span.records))
    console.print(table)
