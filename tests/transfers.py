"""Threads that move money between accounts without pause, for tests of consistent scans
(and benchmarks/bench_frozen_node.py).

    with Transfers(db, accounts, threads=4) as moving:
        ...scan...
    assert moving.errors == [] and moving.moved > 0

Each transfer is one transaction moving 1 from one random account to another, so the total
never changes; a conflict is retried, any other error is kept and stops that thread (unless
``keep_going``). ``done``: each transfer's (monotonic end time, seconds it took).
"""

from __future__ import annotations

import random
import threading
import time

import pykv


class Transfers:
    def __init__(self, db, accounts: list[str], threads: int = 4, keep_going: bool = False) -> None:
        self.db, self.accounts, self.keep_going = db, accounts, keep_going
        self.done: list[tuple[float, float]] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    @property
    def moved(self) -> int:
        return len(self.done)

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self._stop.is_set():
            src, dst = rng.sample(self.accounts, 2)
            started = time.monotonic()
            try:
                with self.db.transaction() as tx:
                    tx.put(src, tx.get(src) - 1)
                    tx.put(dst, tx.get(dst) + 1)
            except pykv.TransactionConflict:
                continue
            except Exception as exc:  # noqa: BLE001 - kept for the test's assertion
                self.errors.append(exc)
                if self.keep_going:
                    continue
                return
            now = time.monotonic()
            self.done.append((now, now - started))

    def __enter__(self) -> Transfers:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def backups_while_moving(db, accounts: list[str], copies: list, acknowledged: str) -> list[list[tuple[int, int]]]:
    """``db.backup`` into each of ``copies`` while Transfers move money between ``accounts``,
    each right after the acknowledged put of ``f"{acknowledged}{n}"``; the progress each
    backup reported. Asserts the transfers ran without errors."""
    reports: list[list[tuple[int, int]]] = []
    with Transfers(db, accounts) as moving:
        for n, copy in enumerate(copies):
            time.sleep(0.3)
            db.put(f"{acknowledged}{n}", moving.moved)
            progress: list[tuple[int, int]] = []
            db.backup(copy, progress=lambda done, total, seen=progress: seen.append((done, total)))
            reports.append(progress)
    assert moving.errors == [] and moving.moved > 0
    return reports
