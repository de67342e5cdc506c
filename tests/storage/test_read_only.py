"""Opening a store read-only: every version readable, no byte of its files changed, writes
refused, many readers at once but never beside a writer."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import pykv
from pykv.codec import encode_value
from pykv.errors import InvalidArgument, ReadOnlyStore, StoreLocked
from pykv.storage import Storage, Update

REPO = Path(__file__).resolve().parents[2]


def _files(directory: Path) -> dict[str, tuple[str, int]]:
    """Every file under directory (but the LOCK a reader may create) -> (md5, mtime)."""
    found = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != "LOCK":
            found[str(path.relative_to(directory))] = (
                hashlib.md5(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return found


def _store_with_hint_and_tail(path: Path) -> None:
    """100 keys under a hint, 50 more (and a delete) only in the WAL after it."""
    with Storage.open(str(path), compaction=False) as store:
        for i in range(100):
            store.commit([Update(f"k{i:03d}".encode(), encode_value(f"v{i}"), b"", i)])
        store.checkpoint()
        for i in range(100, 150):
            store.commit([Update(f"k{i:03d}".encode(), encode_value(f"v{i}"), b"", i)])
        store.commit([Update(b"k000", None, b"", 0)])
        store.close(checkpoint=False)


def _torn(path: Path) -> None:
    """Append half a record to the last WAL segment, as a crash mid-write leaves it."""
    last = sorted((path / "wal").iterdir())[-1]
    with open(last, "ab") as f:
        f.write(b"\x40\x00\x00\x00\x12\x34\x56\x78half a record")


def test_a_read_only_open_reads_everything_and_changes_no_file(tmp_path: Path) -> None:
    path = tmp_path / "db"
    _store_with_hint_and_tail(path)
    _torn(path)
    before = _files(path)
    with Storage.open(str(path), read_only=True) as store:
        assert store.read_only
        assert store.get(b"k149").value == encode_value("v149")  # replayed from after the hint
        assert store.get(b"k000").value is None
        assert len(list(store.scan())) == 149
    assert _files(path) == before  # the torn tail is still there, no hint was written
    with Storage.open(str(path), compaction=False) as store:  # a writer cuts the tail
        assert len(list(store.scan())) == 149


def test_every_write_of_a_read_only_store_is_refused_and_leaves_it_usable(tmp_path: Path) -> None:
    path = tmp_path / "db"
    _store_with_hint_and_tail(path)
    before = _files(path)
    with Storage.open(str(path), read_only=True) as store:
        with pytest.raises(ReadOnlyStore):
            store.commit([Update(b"new", b"x", b"", 0)])
        with pytest.raises(ReadOnlyStore):
            store.checkpoint()
        with pytest.raises(ReadOnlyStore):
            store.compact()
        assert store.get(b"new").value is None and store.get(b"k001").value == encode_value("v1")
    assert _files(path) == before
    db = pykv.open(path, read_only=True)
    try:
        with pytest.raises(ReadOnlyStore, match="read_only=True"):
            db.put("new", "x")
        with pytest.raises(ReadOnlyStore):
            with db.transaction() as tx:
                tx.incr("n")
        for write in (lambda: db.delete("k001"), lambda: db.append("l", 1)):
            with pytest.raises(ReadOnlyStore):
                write()
        with db.transaction() as tx:  # a read-only transaction commits
            assert tx.get("k149") == "v149"
        assert dict(db.scan("k00")) == {f"k00{i}": f"v{i}" for i in range(1, 10)}
    finally:
        db.close()
    assert _files(path) == before


def test_readers_share_a_store_but_never_with_a_writer(tmp_path: Path) -> None:
    path = tmp_path / "db"
    _store_with_hint_and_tail(path)
    first = Storage.open(str(path), read_only=True)
    second = Storage.open(str(path), read_only=True)
    with pytest.raises(StoreLocked, match="opened read-only"):
        Storage.open(str(path), compaction=False)
    child = _in_child(f"Storage.open({str(path)!r}, read_only=True).get(b'k001').value")
    assert child == repr(encode_value("v1"))  # a reader in another process too
    first.close()
    second.close()
    writer = Storage.open(str(path), compaction=False)
    try:
        with pytest.raises(StoreLocked, match=f"pid {os.getpid()}"):
            Storage.open(str(path), read_only=True)
        assert "StoreLocked" in _in_child(f"Storage.open({str(path)!r}, read_only=True)")
    finally:
        writer.close()


def test_a_read_only_open_of_a_missing_store_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="not a pykv store"):
        pykv.open(tmp_path / "nowhere", read_only=True)
    assert not (tmp_path / "nowhere").exists()


def test_a_backup_of_a_read_only_store_holds_every_whole_record(tmp_path: Path) -> None:
    path = tmp_path / "db"
    _store_with_hint_and_tail(path)
    _torn(path)
    before = _files(path)
    with pykv.open(path, read_only=True) as db:
        db.backup(str(tmp_path / "copy"))
    assert _files(path) == before
    with pykv.open(tmp_path / "copy") as copy:  # a writer's open: the copy has no torn tail
        assert len(list(copy.scan())) == 149 and copy.get("k149") == "v149"
        copy.put("more", 1)


def _in_child(expression: str) -> str:
    """What another process prints for ``expression`` (or the name of the error it raises)."""
    code = (
        "from pykv.storage import Storage\n"
        "try:\n"
        f"    print({expression})\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, check=True).stdout.strip()


def test_pykv_check_and_backup_leave_the_store_as_they_found_it(tmp_path: Path) -> None:
    path = tmp_path / "db"
    _store_with_hint_and_tail(path)
    _torn(path)
    before = _files(path)
    check = _pykv("check", str(path), "--json")
    assert check.returncode == 0, check.stderr
    backup = _pykv("backup", str(path), str(tmp_path / "copy"))
    assert backup.returncode == 0 and "holding 149 keys" in " ".join(backup.stderr.split())
    assert _files(path) == before  # a torn tail is a writer's to cut; no checkpoint written
    assert _files(tmp_path / "copy").keys() >= {"hint", "NODE_ID"}


def _pykv(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "pykv.server.cli", *argv], capture_output=True,
                          text=True, env=env, timeout=120)
