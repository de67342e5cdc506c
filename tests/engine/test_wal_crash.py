"""Crash tests with real processes: SIGKILL at a random moment and the WAL's fsync failpoints.

A child appends records from several threads and prints each lsn once append() returned
(acknowledged); the parent kills it, reopens the log, and checks that every acknowledged
record is there, intact, at its lsn.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pykv._engine.wal import WalWriter, read_wal

CHILD = textwrap.dedent(
    """
    import sys, threading
    from pykv._engine.wal import WalWriter

    directory, threads, per_thread = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    writer = WalWriter(directory, segment_bytes=16 << 10, fsync="always", preallocate=sys.argv[4] == "1")
    out = threading.Lock()

    def payload(thread, i):
        return (b"%d:%d:" % (thread, i)) * (1 + (thread * 7 + i) % 13)

    def run(thread):
        for i in range(per_thread):
            lsn = writer.append(payload(thread, i))
            with out:
                sys.stdout.write("%d %d %d\\n" % (lsn, thread, i))
                sys.stdout.flush()

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    writer.close()
    """
)


def expected_payload(thread: int, i: int) -> bytes:
    return (b"%d:%d:" % (thread, i)) * (1 + (thread * 7 + i) % 13)


def start_child(directory: Path, threads: int, per_thread: int, failpoint: str | None = None,
                preallocate: bool = False):
    env = dict(os.environ)
    env.pop("PYKV_FAILPOINT", None)
    if failpoint:
        env["PYKV_FAILPOINT"] = failpoint
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(directory), str(threads), str(per_thread), str(int(preallocate))],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )


def parse_acks(lines: list[str]) -> dict[int, bytes]:
    acks = {}
    for line in lines:
        lsn, thread, i = map(int, line.split())
        acks[lsn] = expected_payload(thread, i)
    return acks


def check_log_holds(directory: Path, acks: dict[int, bytes]) -> int:
    records = {r.lsn: r.payload for r in read_wal(str(directory))}
    assert sorted(records) == list(range(1, len(records) + 1)), "lsns must stay contiguous"
    for lsn, payload in acks.items():
        assert records.get(lsn) == payload, f"acknowledged lsn {lsn} lost or damaged"
    # The log stays writable after the crash, right after its last record.
    with WalWriter(str(directory)) as writer:
        assert writer.append(b"after the crash") == len(records) + 1
    return len(records)


@pytest.mark.parametrize("preallocate", [False, True])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_at_a_random_moment_loses_no_acknowledged_record(tmp_path: Path, seed: int, preallocate: bool) -> None:
    """8 threads append to 16 KiB segments (preallocated, or grown by each append) until a
    SIGKILL at a random moment: every acknowledged record is there after it."""
    rng = random.Random(seed)
    kill_after = rng.randint(20, 600)
    child = start_child(tmp_path, threads=8, per_thread=10_000, preallocate=preallocate)
    lines = []
    try:
        while len(lines) < kill_after:
            line = child.stdout.readline()
            assert line, "the child ended before it was killed"
            lines.append(line)
        child.send_signal(signal.SIGKILL)
        lines.extend(child.stdout.readlines())  # acknowledged before the kill landed
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    acks = parse_acks(lines)
    assert check_log_holds(tmp_path, acks) >= len(acks)


@pytest.mark.parametrize("preallocate", [False, True])
@pytest.mark.parametrize("failpoint", ["wal.before_fsync:7", "wal.after_fsync:7", "wal.before_fsync:1"])
def test_crash_at_an_fsync_failpoint_loses_no_acknowledged_record(
        tmp_path: Path, failpoint: str, preallocate: bool) -> None:
    child = start_child(tmp_path, threads=4, per_thread=500, failpoint=failpoint, preallocate=preallocate)
    lines = child.stdout.readlines()
    child.wait()
    child.stdout.close()
    assert child.returncode == 137
    acks = parse_acks(lines)
    assert len(acks) < 4 * 500
    if failpoint.endswith(":1"):
        assert acks == {}  # nothing is acknowledged before the first fsync
    check_log_holds(tmp_path, acks)


def test_a_process_that_never_closes_its_writer_exits_and_keeps_its_records(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import sys
        from pykv._engine.wal import WalWriter
        writer = WalWriter(sys.argv[1], fsync="interval", interval_ms=60_000)
        for i in range(100):
            writer.submit(b"%d" % i)
        """
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], timeout=60)
    assert done.returncode == 0
    assert [r.payload for r in read_wal(str(tmp_path))] == [b"%d" % i for i in range(100)]
