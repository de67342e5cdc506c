"""The transient progress bar of a long offline command (check, salvage, backup)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

T = TypeVar("T")
# What the work calls as it goes: ``report(done)``, or ``report(done, total)`` once it knows.
Report = Callable[..., None]


def with_progress(label: str, work: Callable[[Report | None], T], console: Console, *,
                  quiet: bool = False, total: int | None = None, in_bytes: bool = False) -> T:
    """``work(report)`` under a bar (``work(None)`` when quiet, as under --json)."""
    if quiet:
        return work(None)
    count = DownloadColumn() if in_bytes else MofNCompleteColumn()
    columns = (TextColumn(label), BarColumn(), count, TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(label, total=total)

        def report(done: int, total: int | None = None) -> None:
            progress.update(task, completed=done, total=total)  # total None: unchanged

        return work(report)
