"""Crash safety with real processes: SIGKILL under load, failpoints, torn WAL tails."""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pykv.errors import CorruptData
from pykv.storage import Storage
from pykv.storage.failpoints import POINTS

CHILD = Path(__file__).with_name("storage_child.py")
_spec = importlib.util.spec_from_file_location("storage_child", CHILD)
child = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(child)

REPO = Path(__file__).resolve().parents[2]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("PYKV_FAILPOINT", None)
    env.update(extra)
    return env


def run_child(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHILD), *args], env=child_env(**env),
                          capture_output=True, text=True, timeout=60)


# --- SIGKILL under load --------------------------------------------------------------------


def kill_during_load(path: str, threads: int, run_for: float, acked: dict[int, int]) -> None:
    """Start a loaded child, SIGKILL it after run_for seconds of acks, record what it acked."""
    proc = subprocess.Popen([sys.executable, str(CHILD), "load", path, str(threads)],
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    first_ack = threading.Event()

    def read_acks() -> None:
        for line in proc.stdout:
            _, thread, seq = line.split()
            acked[int(thread)] = max(acked.get(int(thread), -1), int(seq))
            first_ack.set()

    reader = threading.Thread(target=read_acks)
    reader.start()
    first_ack.wait(timeout=30)
    time.sleep(run_for)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reader.join()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()


def test_sigkill_under_load_loses_no_acknowledged_commit(tmp_path: Path) -> None:
    # Rounds on the same directory: each child resumes from what the last one left behind, so
    # recovery also runs over hints and compactions made by killed processes.
    rng = random.Random(20261122)
    path = str(tmp_path / "db")
    acked: dict[int, int] = {}
    threads = 4
    previous = 0
    for _ in range(5):
        kill_during_load(path, threads, rng.uniform(0.2, 1.2), acked)
        with Storage.open(path, compaction=False) as store:
            found = child.verify_load(store, threads, acked)
        assert found >= previous  # nothing acknowledged earlier disappeared
        previous = found
    assert sum(seq + 1 for seq in acked.values()) > 100  # the rounds did real work


@pytest.mark.parametrize("point", ["wal.before_fsync:40", "wal.after_fsync:40"])
def test_crash_around_the_wal_fsync_loses_no_acknowledged_commit(tmp_path: Path, point: str) -> None:
    path = str(tmp_path / "db")
    proc = subprocess.run([sys.executable, str(CHILD), "load", path, "3"], capture_output=True,
                          text=True, env=child_env(PYKV_FAILPOINT=point), timeout=60)
    assert proc.returncode == 137, proc.stderr
    acked: dict[int, int] = {}
    for line in proc.stdout.splitlines():
        _, thread, seq = line.split()
        acked[int(thread)] = max(acked.get(int(thread), -1), int(seq))
    assert acked  # the first 39 fsyncs acknowledged commits before the crash
    with Storage.open(path, compaction=False) as store:
        assert child.verify_load(store, 3, acked) >= sum(seq + 1 for seq in acked.values())


# --- failpoints in compaction and checkpoint -----------------------------------------------


def assert_mostly_live(stats: dict) -> None:
    """After a full compaction only record headers are dead (a few % of the bytes)."""
    total = stats["live_bytes"] + stats["dead_bytes"]
    assert stats["dead_bytes"] < 0.1 * total, stats


@pytest.mark.parametrize("point", sorted(POINTS))
def test_crash_at_failpoint_then_recover(tmp_path: Path, point: str) -> None:
    path = str(tmp_path / "db")
    action = "checkpoint" if point.startswith("storage.checkpoint") else "compact"
    result = run_child("fill", path, action, PYKV_FAILPOINT=point)
    assert result.returncode == 137, f"failpoint {point} did not fire: {result.stderr}"
    with Storage.open(path, compaction=False) as store:
        child.verify_fill(store)
        before = store.stats()
        stats = store.compact()
        child.verify_fill(store)
        after = store.stats()
    assert stats.segments and after["dead_bytes"] < before["dead_bytes"]
    assert_mostly_live(after)
    with Storage.open(path, compaction=False) as store:
        child.verify_fill(store)


def test_compaction_and_checkpoint_complete_without_failpoints(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    result = run_child("fill", path, "compact")
    assert result.returncode == 0, result.stderr
    with Storage.open(path, compaction=False) as store:
        child.verify_fill(store)
        assert_mostly_live(store.stats())


# --- torn tails ----------------------------------------------------------------------------


def record_ends(segment: Path) -> list[int]:
    """Byte offset just past each record of a WAL segment (32-byte header, [len|crc|payload]),
    up to the zeros of its preallocated end (no record has 8 zero bytes: its CRC covers its
    length field)."""
    data = segment.read_bytes()
    ends, pos = [], 32
    while pos + 8 <= len(data) and data[pos:pos + 8] != bytes(8):
        (word,) = struct.unpack_from("<I", data, pos)
        pos += 8 + (word & 0x7FFFFFFF)
        ends.append(pos)
    return ends


def test_torn_tail_recovers_exactly_the_complete_prefix(tmp_path: Path) -> None:
    count = 60
    source = tmp_path / "source"
    result = run_child("torn", str(source), str(count))
    assert result.returncode == 0, result.stderr
    (segment,) = sorted((source / "wal").iterdir())
    ends = record_ends(segment)
    assert len(ends) == count
    checkpointed = count // 2 + 1  # the child checkpointed after commit number count // 2
    rng = random.Random(7)
    cuts = [rng.randrange(ends[checkpointed - 1], ends[-1]) for _ in range(12)] + [ends[-1] - 1]
    for trial, cut in enumerate(cuts):
        copy = tmp_path / f"trial{trial}"
        shutil.copytree(source, copy)
        os.truncate(copy / "wal" / segment.name, cut)
        complete = sum(1 for end in ends if end <= cut)
        with Storage.open(str(copy), compaction=False) as store:
            assert store.last_lsn == complete
            for n in range(count):
                got = store.get(f"each{n:05d}".encode())
                expect = child.value_of(8, n, "each") if n < complete else None
                assert got.value == expect, f"cut at {cut}: record {n + 1} of {complete}"
            for slot in range(7):
                writers = [n for n in range(complete) if n % 7 == slot]
                got = store.get(f"torn{slot}".encode())
                assert got.clock == (f"c{writers[-1]}".encode() if writers else b"")
            store.commit(child.torn_updates(count))  # the log continues after the cut
        shutil.rmtree(copy)


def test_corrupt_last_record_is_cut_but_a_lost_checkpointed_record_is_an_error(tmp_path: Path) -> None:
    source = tmp_path / "source"
    assert run_child("torn", str(source), "20").returncode == 0
    (segment,) = sorted((source / "wal").iterdir())
    ends = record_ends(segment)

    flipped = tmp_path / "flipped"
    shutil.copytree(source, flipped)
    with open(flipped / "wal" / segment.name, "r+b") as f:
        f.seek(ends[-1] - 3)
        byte = f.read(1)
        f.seek(ends[-1] - 3)
        f.write(bytes([byte[0] ^ 0xFF]))
    with Storage.open(str(flipped), compaction=False) as store:
        assert store.last_lsn == len(ends) - 1
        assert store.get(b"each00019").value is None
        assert store.get(b"each00018").value == child.value_of(8, 18, "each")

    # Cutting records the hint already covers is not a torn tail: it must not open silently.
    lost = tmp_path / "lost"
    shutil.copytree(source, lost)
    os.truncate(lost / "wal" / segment.name, ends[3])
    with pytest.raises(CorruptData):
        Storage.open(str(lost), compaction=False)
    # ... and refusing must not "repair" the evidence away.
    assert (lost / "wal" / segment.name).stat().st_size == ends[3]


def test_a_corrupt_record_in_the_middle_of_the_last_segment_refuses_to_open(tmp_path: Path) -> None:
    """A flipped bit in acknowledged data with valid records after it is not a torn tail:
    cutting there would silently drop the later commits, so open raises and cuts nothing."""
    source = tmp_path / "source"
    assert run_child("torn", str(source), "20").returncode == 0
    (segment,) = sorted((source / "wal").iterdir())
    ends = record_ends(segment)
    path = source / "wal" / segment.name
    with open(path, "r+b") as f:
        f.seek(ends[-5] - 3)  # inside the 5th-last record, well after the checkpoint
        byte = f.read(1)
        f.seek(ends[-5] - 3)
        f.write(bytes([byte[0] ^ 0x01]))
    damaged = path.read_bytes()
    with pytest.raises(CorruptData, match=f"at byte {ends[-6]} of segment"):
        Storage.open(str(source), compaction=False)
    assert path.read_bytes() == damaged
