"""Crash safety with real processes: SIGKILL a writer at random moments, then reopen.

A child process runs transfer transactions from several threads (each moves money between
two accounts, bumps a counter and writes a marker key) and prints every marker once its
commit returned. The parent kills it with SIGKILL at a random moment, reopens the store and
checks: every acknowledged commit is there, no transaction is partly visible (the money sum
is constant and the counter equals the number of markers), no read returned a commit that
the crash then lost (a reader thread prints every counter value it sees), and new
transactions commit.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import pykv

ACCOUNTS = 8
START_BALANCE = 1000
ROUNDS = 20

CHILD = textwrap.dedent(
    """
    import random, sys, threading
    import pykv

    path, run = sys.argv[1], int(sys.argv[2])
    db = pykv.open(path)
    out = threading.Lock()

    def worker(index):
        rng = random.Random(run * 100 + index)
        n = 0
        while True:
            src, dst = rng.sample(range(%(accounts)d), 2)
            amount = rng.randint(1, 50)
            marker = f"ack/{run}/{index}/{n}"

            def transfer(tx):
                tx.put(f"acct/{src}", tx.get(f"acct/{src}") - amount)
                tx.put(f"acct/{dst}", tx.get(f"acct/{dst}") + amount)
                tx.incr("count", 1)
                tx.put(marker, amount)

            db.transact(transfer, retries=10_000)
            with out:
                sys.stdout.write(marker + "\\n")
                sys.stdout.flush()
            n += 1

    def reader():
        # Reads must never show a commit a crash could still undo: print every new count seen.
        last = -1
        while True:
            seen = db.get("count", 0)
            if seen > last:
                with out:
                    sys.stdout.write(f"seen {seen}\\n")
                    sys.stdout.flush()
                last = seen

    with out:
        sys.stdout.write("ready\\n")
        sys.stdout.flush()
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(4)]
    threads.append(threading.Thread(target=reader, daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    """
) % {"accounts": ACCOUNTS}


def _run_and_kill(path: Path, run: int, rng: random.Random) -> tuple[list[str], int]:
    """Start a child, SIGKILL it at a random moment; return the markers it acknowledged
    and the highest transfer count one of its reads returned."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    lines: list[str] = []
    seen: list[int] = [0]
    ready = threading.Event()

    def read() -> None:
        for raw in child.stdout:  # a line cut by the kill has no newline: not acknowledged
            if raw.endswith(b"\n"):
                line = raw.decode().strip()
                if line == "ready":
                    ready.set()
                elif line.startswith("seen "):
                    seen.append(int(line.split()[1]))
                else:
                    lines.append(line)
        ready.set()

    reader = threading.Thread(target=read)
    reader.start()
    if rng.random() < 0.2:
        time.sleep(rng.uniform(0.0, 0.3))  # sometimes during start-up and recovery
    else:
        ready.wait(timeout=20)
        time.sleep(rng.uniform(0.02, 0.4))
    child.send_signal(signal.SIGKILL)
    child.wait()
    reader.join()
    stderr = child.stderr.read().decode()
    child.stderr.close()
    child.stdout.close()
    assert child.returncode == -signal.SIGKILL, f"the child failed on its own:\n{stderr}"
    return lines, max(seen)


def _check(path: Path, acknowledged: list[str], highest_read: int) -> int:
    with pykv.open(path) as db:
        with db.transaction() as tx:
            balances = [tx.get(f"acct/{i}") for i in range(ACCOUNTS)]
            count = tx.get("count", 0)
        markers = dict(db.scan("ack/"))
        missing = [m for m in acknowledged if m not in markers]
        assert not missing, f"{len(missing)} acknowledged commits lost, e.g. {missing[:3]}"
        assert sum(balances) == ACCOUNTS * START_BALANCE, f"a partial transfer: {balances}"
        assert count == len(markers), "the counter and the markers disagree: a partial commit"
        assert count >= highest_read, f"a read returned count {highest_read}, now lost ({count})"
        # The store still accepts new transactions.
        db.transact(lambda tx: tx.put("acct/0", tx.get("acct/0") + 0))
        db.put("after-crash", count)
        assert db.get("after-crash") == count
        return len(markers)


@pytest.mark.slow
def test_sigkill_never_loses_an_acknowledged_commit(tmp_path):
    path = tmp_path / "db"
    with pykv.open(path) as db, db.transaction() as tx:
        for i in range(ACCOUNTS):
            tx.put(f"acct/{i}", START_BALANCE)
    rng = random.Random(2024)
    acknowledged: list[str] = []
    deadline = time.monotonic() + 50
    rounds = 0
    while rounds < ROUNDS and time.monotonic() < deadline:
        acked, highest_read = _run_and_kill(path, rounds, rng)
        acknowledged += acked
        committed = _check(path, acknowledged, highest_read)
        assert committed >= len(acknowledged)
        rounds += 1
    assert rounds == ROUNDS, f"only {rounds} rounds fitted in the time budget"
    assert len(acknowledged) > ROUNDS  # the children did commit work before being killed
