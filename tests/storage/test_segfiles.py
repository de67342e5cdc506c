"""Segment file descriptors: bounded, shared, and never closed under a reader."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pykv.errors import CorruptData
from pykv.storage import Storage, Update
from pykv.storage.segfiles import SegmentFiles


def make_segments(tmp_path: Path, count: int) -> SegmentFiles:
    for seg in range(count):
        (tmp_path / f"{seg}.seg").write_bytes(b"segment %d" % seg)
    return SegmentFiles(lambda seg: str(tmp_path / f"{seg}.seg"), max_open=4)


def test_idle_descriptors_are_bounded_least_recently_used_first(tmp_path: Path) -> None:
    files = make_segments(tmp_path, 10)
    for seg in range(10):
        files.release(files.acquire(seg))
    assert len(files) == 4
    fd = files.acquire(9)  # still open: the most recently used
    assert os.pread(fd, 9, 0) == b"segment 9"
    files.release(fd)


def test_a_descriptor_in_use_survives_eviction_and_deletion(tmp_path: Path) -> None:
    files = make_segments(tmp_path, 10)
    held = files.acquire(0)
    os.unlink(tmp_path / "0.seg")
    files.forget(0)  # compaction deleted the segment while a reader is mid-pread
    for seg in range(1, 10):
        files.release(files.acquire(seg))
    assert os.pread(held, 9, 0) == b"segment 0"
    files.release(held)  # the last user closes it
    with pytest.raises(OSError):
        os.fstat(held)
    files.close_all()
    assert len(files) == 0


def test_a_store_with_many_segments_keeps_few_descriptors(tmp_path: Path) -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    with Storage.open(str(tmp_path / "db"), segment_bytes=4096, cache_bytes=0,
                      compaction=False) as store:
        for i in range(400):  # ~1 KiB per record: about 400 / 3 segments... and more
            store.commit([Update(b"k%03d" % i, bytes([i % 256]) * 1500, b"", i)])
        assert len(store.stats()["segments"]) >= 200
        baseline = open_fds()
        for i in range(400):
            assert store.get(b"k%03d" % i).value == bytes([i % 256]) * 1500
        assert open_fds() - baseline <= 128


def test_a_corrupted_value_on_disk_raises_instead_of_returning_garbage(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with Storage.open(str(path), segment_bytes=1024, cache_bytes=0, compaction=False) as store:
        store.commit([Update(b"k", b"precious value", b"", 0)])
        for i in range(5):  # roll to later segments: recovery will not rescan the first one
            store.commit([Update(b"other%d" % i, b"x" * 800, b"", 0)])
    segment = min((path / "wal").iterdir())
    data = bytearray(segment.read_bytes())
    at = data.rindex(b"precious")
    data[at] ^= 0x01
    segment.write_bytes(bytes(data))
    with Storage.open(str(path), cache_bytes=0, compaction=False) as store:
        with pytest.raises(CorruptData):
            store.get(b"k")
        assert store.get(b"other4").value == b"x" * 800
