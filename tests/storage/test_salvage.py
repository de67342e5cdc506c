"""Salvage of a store whose WAL is damaged mid-log: the copy opens, holds every transaction
but the damaged ones, and keeps taking commits; the source is never written."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from pykv._engine.wal import read_wal
from pykv.errors import CorruptData, InvalidArgument, StoreLocked
from pykv.storage import Storage, Update
from pykv.storage.hint import read_hint
from pykv.storage.salvage import salvage

RECORDS = 400
SEGMENT_BYTES = 16 << 10


def _value(n: int) -> bytes:
    return hashlib.blake2b(str(n).encode(), digest_size=16).digest() * (1 + n % 5)


def _updates(n: int) -> list[Update]:
    """Commit n: a shared key written over and over, a key of its own, and a delete of the
    key of commit n - 7 (with a clock: a tombstone) unless that one is kept for good (every
    segment keeps live values: only compaction deletes segments)."""
    clock = f"c{n}".encode()
    updates = [Update(f"shared{n % 10}".encode(), _value(n), clock, n + 1),
               Update(f"own{n:05d}".encode(), _value(-n), clock, n + 1)]
    if n >= 7 and (n - 7) % 3:
        updates.append(Update(f"own{n - 7:05d}".encode(), None, clock, n + 1))
    return updates


def _expected(skipped: set[int]) -> dict[bytes, bytes | None]:
    """Every key's value after the commits but the skipped ones (lsn n + 1 is commit n)."""
    state: dict[bytes, bytes | None] = {}
    for n in range(RECORDS):
        if n + 1 not in skipped:
            for update in _updates(n):
                state[update.key] = update.value
    return state


def _build(path: Path, *, checkpoint_at: int | None = None) -> None:
    store = Storage.open(str(path), segment_bytes=SEGMENT_BYTES, compaction=False)
    for n in range(RECORDS):
        store.commit(_updates(n))
        if n + 1 == checkpoint_at:
            store.checkpoint()
    store.close(checkpoint=False)  # as a crash leaves it: the open replays the WAL


def _records(path: Path) -> list:
    return list(read_wal(str(path / "wal"), repair=False))


def _flip(path: Path, segment_id: int, offset: int) -> None:
    with open(path / "wal" / f"{segment_id:020d}.wal", "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))


def _assert_holds(path: Path, expected: dict[bytes, bytes | None]) -> None:
    with Storage.open(str(path), compaction=False) as store:
        for key, value in expected.items():
            assert store.get(key).value == value, key


def _wal_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((path / "wal").iterdir())}


@pytest.mark.parametrize("where", ["payload", "length"])
def test_a_damaged_record_in_a_sealed_segment_loses_its_transaction_only(tmp_path: Path, where: str) -> None:
    source = tmp_path / "source"
    _build(source, checkpoint_at=50)
    records = _records(source)
    segments = sorted({r.segment_id for r in records})
    assert len(segments) >= 4
    victim = next(r for r in records if r.segment_id == segments[2])  # a sealed segment
    frame = victim.offset - 8
    # A flipped payload byte keeps the length field (one record is lost, known at once); a
    # flipped length byte leaves only the next segment's first lsn to count what was lost.
    _flip(source, victim.segment_id, frame + 20 if where == "payload" else frame + 1)
    with pytest.raises(CorruptData, match="mid-log corruption"):
        Storage.open(str(source), compaction=False)
    before = _wal_bytes(source)

    report = salvage(source, tmp_path / "copy")

    assert [(s.segment, s.first_lsn, s.records) for s in report.damaged] == [
        (victim.segment_id, victim.lsn, 1)
    ]
    assert report.records == RECORDS - 1
    assert _wal_bytes(source) == before  # the source is only read
    _assert_holds(tmp_path / "copy", _expected({victim.lsn}))


def test_damage_in_the_last_segment_and_commits_after_salvage(tmp_path: Path) -> None:
    source = tmp_path / "source"
    _build(source)
    records = _records(source)
    last = [r for r in records if r.segment_id == records[-1].segment_id]
    victims = [last[2], last[5]]
    for victim in victims:
        _flip(source, victim.segment_id, victim.offset + 3)
    report = salvage(source, tmp_path / "copy")
    assert [s.first_lsn for s in report.damaged] == [v.lsn for v in victims]
    expected = _expected({v.lsn for v in victims})
    with Storage.open(str(tmp_path / "copy"), compaction=False) as store:
        assert store.last_lsn == RECORDS
        store.commit([Update(b"after", b"salvage", b"c", 10**6)])
    expected[b"after"] = b"salvage"
    _assert_holds(tmp_path / "copy", expected)


def test_salvage_of_an_intact_compacted_store_copies_it_exactly(tmp_path: Path) -> None:
    source = tmp_path / "source"
    _build(source)
    with Storage.open(str(source), segment_bytes=SEGMENT_BYTES, compaction=False) as store:
        stats = store.compact()
        assert stats.segments  # the oldest segments were rewritten and deleted
        keys = list(store.keys())
        versions = {key: store.get(key) for key in keys}
    report = salvage(source, tmp_path / "copy")
    assert report.damaged == [] and not report.hint_dropped
    with Storage.open(str(tmp_path / "copy"), compaction=False) as copy:
        assert list(copy.keys()) == keys
        assert {key: copy.get(key) for key in keys} == versions


def test_a_damaged_hint_is_dropped_while_the_wal_holds_everything(tmp_path: Path) -> None:
    source = tmp_path / "source"
    _build(source, checkpoint_at=200)
    hint = source / "hint"
    data = bytearray(hint.read_bytes())
    data[len(data) // 2] ^= 0x01
    hint.write_bytes(bytes(data))
    with pytest.raises(CorruptData):
        Storage.open(str(source), compaction=False)
    report = salvage(source, tmp_path / "copy")
    assert report.hint_dropped and report.damaged == []
    _assert_holds(tmp_path / "copy", _expected(set()))


def test_a_damaged_hint_over_a_compacted_wal_cannot_be_salvaged(tmp_path: Path) -> None:
    source = tmp_path / "source"
    _build(source)
    with Storage.open(str(source), segment_bytes=SEGMENT_BYTES, compaction=False) as store:
        assert store.compact().segments
    checkpoint_lsn, entries = read_hint(str(source / "hint"))
    list(entries)
    data = bytearray((source / "hint").read_bytes())
    data[-10] ^= 0x01
    (source / "hint").write_bytes(bytes(data))
    with pytest.raises(CorruptData, match="no longer holds the records before lsn"):
        salvage(source, tmp_path / "copy")


def test_salvage_refuses_a_target_in_use_and_a_source_that_is_open(tmp_path: Path) -> None:
    source = tmp_path / "source"
    _build(source)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("mine")
    with pytest.raises(InvalidArgument, match="is not empty"):
        salvage(source, tmp_path / "taken")
    assert os.listdir(tmp_path / "taken") == ["mine.txt"]
    with pytest.raises(InvalidArgument, match="not a store's directory"):
        salvage(tmp_path / "taken", tmp_path / "copy")
    with Storage.open(str(source), compaction=False), pytest.raises(StoreLocked):
        salvage(source, tmp_path / "copy")
