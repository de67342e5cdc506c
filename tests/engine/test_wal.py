"""The group-commit WAL: framing, recovery of torn and corrupt tails, segments, policies, threads."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import crc32c as crc32c_package
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykv._engine import wal
from pykv._engine.wal import WalWriter, read_wal, segment_path
from pykv.errors import CorruptData, StoreClosed

payload_lists = st.lists(st.binary(max_size=40), min_size=1, max_size=12)


def write_log(directory: Path, payloads: list[bytes], **options) -> list[int]:
    with WalWriter(str(directory), fsync="off", **options) as writer:
        return [writer.append(p) for p in payloads]


def payloads_of(directory: Path, **options) -> list[bytes]:
    return [r.payload for r in read_wal(str(directory), **options)]


def last_segment(directory: Path) -> Path:
    return sorted(directory.glob("*.wal"))[-1]


# --- crc32c ------------------------------------------------------------------------------------


@settings(deadline=None, max_examples=100)
@given(st.binary(max_size=300), st.integers(0, 2**32 - 1))
def test_crc32c_matches_the_crc32c_package(data: bytes, start: int) -> None:
    expected = crc32c_package.crc32c(data, start)
    try:
        assert wal.crc32c(data, start) == expected
        wal._use_hardware_crc(False)
        assert wal.crc32c(data, start) == expected
    finally:
        wal._use_hardware_crc(True)


def test_crc32c_known_value() -> None:
    assert wal.crc32c(b"123456789") == 0xE3069283


# --- round trips -------------------------------------------------------------------------------


@settings(deadline=None, max_examples=40)
@given(payload_lists, st.sampled_from([64, 100, 4096]))
def test_records_round_trip_across_segments(tmp_path_factory, payloads, segment_bytes) -> None:
    directory = tmp_path_factory.mktemp("wal")
    lsns = write_log(directory, payloads, segment_bytes=segment_bytes)
    assert lsns == list(range(1, len(payloads) + 1))
    records = list(read_wal(str(directory)))
    assert [r.payload for r in records] == payloads
    assert [r.lsn for r in records] == lsns
    for record in records:
        # offset is where the payload sits in the segment file: readers may pread it.
        data = Path(segment_path(str(directory), record.segment_id)).read_bytes()
        assert data[record.offset:record.offset + len(record.payload)] == record.payload


def test_locate_agrees_with_the_reader(tmp_path: Path) -> None:
    with WalWriter(str(tmp_path), segment_bytes=128, fsync="off") as writer:
        for i in range(30):
            writer.append(b"%d" % i * 5)
        located = {lsn: writer.locate(lsn) for lsn in range(1, 31)}
        with pytest.raises(KeyError):
            writer.locate(31)
        with pytest.raises(KeyError):
            writer.locate(0)
    assert {r.lsn: (r.segment_id, r.offset) for r in read_wal(str(tmp_path))} == located
    # A reopened writer knows the records of the segment it recovered.
    with WalWriter(str(tmp_path), segment_bytes=128, fsync="off") as writer:
        tail = writer.segments()[-1]
        assert writer.locate(30) == located[30]
        assert writer.locate(tail) == located[tail]


def test_reopen_continues_after_the_last_record(tmp_path: Path) -> None:
    write_log(tmp_path, [b"a", b"b"])
    with WalWriter(str(tmp_path)) as writer:
        assert writer.last_lsn == writer.durable_lsn == 2
        assert writer.append(b"c") == 3
    assert payloads_of(tmp_path) == [b"a", b"b", b"c"]


def test_start_lsn_begins_an_empty_log(tmp_path: Path) -> None:
    with WalWriter(str(tmp_path), start_lsn=1000) as writer:
        assert writer.last_lsn == 999
        assert writer.append(b"x") == 1000
        assert writer.segments() == [1000]
    assert [r.lsn for r in read_wal(str(tmp_path))] == [1000]
    with pytest.raises(ValueError):
        WalWriter(str(tmp_path), start_lsn=5)
    with WalWriter(str(tmp_path), start_lsn=1001) as writer:
        assert writer.append(b"y") == 1001


def test_read_from_lsn_skips_earlier_records(tmp_path: Path) -> None:
    write_log(tmp_path, [b"r%d" % i for i in range(1, 41)], segment_bytes=80)
    assert [r.lsn for r in read_wal(str(tmp_path), from_lsn=23)] == list(range(23, 41))


def test_empty_payloads_and_empty_directory(tmp_path: Path) -> None:
    assert list(read_wal(str(tmp_path))) == []
    write_log(tmp_path, [b"", b"", b"x"])
    assert payloads_of(tmp_path) == [b"", b"", b"x"]


def test_payloads_may_be_any_bytes_like(tmp_path: Path) -> None:
    with WalWriter(str(tmp_path), fsync="off") as writer:
        writer.append(bytearray(b"ba"))
        writer.append(memoryview(b"mv"))
        with pytest.raises(TypeError):
            writer.append("text")
    assert payloads_of(tmp_path) == [b"ba", b"mv"]


def test_bad_options_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        WalWriter(str(tmp_path), fsync="sometimes")
    with pytest.raises(ValueError):
        WalWriter(str(tmp_path), segment_bytes=10)


# --- torn and corrupt tails --------------------------------------------------------------------


@settings(deadline=None, max_examples=12)
@given(payload_lists.filter(lambda ps: len(ps[-1]) > 0))
def test_truncation_at_every_byte_of_the_last_record_keeps_the_prefix(tmp_path_factory, payloads) -> None:
    source = tmp_path_factory.mktemp("wal")
    write_log(source, payloads)
    segment = last_segment(source)
    size = segment.stat().st_size
    record_start = size - len(payloads[-1]) - wal.RECORD_OVERHEAD
    for cut in range(record_start, size):
        work = tmp_path_factory.mktemp("cut")
        shutil.copytree(source, work, dirs_exist_ok=True)
        os.truncate(last_segment(work), cut)
        assert payloads_of(work) == payloads[:-1]
        # The repair cut the tail, so the writer continues right after the prefix.
        assert last_segment(work).stat().st_size == record_start
        with WalWriter(str(work), fsync="off") as writer:
            assert writer.append(b"next") == len(payloads)
        assert payloads_of(work) == payloads[:-1] + [b"next"]


@settings(deadline=None, max_examples=12)
@given(payload_lists.filter(lambda ps: len(ps[-1]) > 0), st.data())
def test_a_flipped_bit_in_the_last_record_is_detected(tmp_path_factory, payloads, data) -> None:
    directory = tmp_path_factory.mktemp("wal")
    write_log(directory, payloads)
    segment = last_segment(directory)
    raw = bytearray(segment.read_bytes())
    record_start = len(raw) - len(payloads[-1]) - wal.RECORD_OVERHEAD
    position = data.draw(st.integers(record_start, len(raw) - 1))
    raw[position] ^= 1 << data.draw(st.integers(0, 7))
    segment.write_bytes(bytes(raw))
    assert payloads_of(directory, repair=False) == payloads[:-1]


@settings(deadline=None, max_examples=30)
@given(st.lists(st.lists(st.binary(max_size=20), min_size=1, max_size=4), min_size=1, max_size=6),
       st.data())
def test_a_cut_anywhere_keeps_exactly_the_complete_batches(tmp_path_factory, batches, data) -> None:
    directory = tmp_path_factory.mktemp("wal")
    with WalWriter(str(directory), fsync="off") as writer:
        for batch in batches:
            writer.append_many(batch)
    segment = last_segment(directory)
    cut = data.draw(st.integers(wal.HEADER_SIZE, segment.stat().st_size))
    os.truncate(segment, cut)
    kept, end = [], wal.HEADER_SIZE
    for batch in batches:
        end += sum(wal.RECORD_OVERHEAD + len(p) for p in batch)
        if end > cut:
            break
        kept.extend(batch)
    assert payloads_of(directory) == kept


@settings(deadline=None, max_examples=20)
@given(st.lists(st.binary(min_size=1, max_size=40), min_size=3, max_size=12), st.data())
def test_a_flipped_bit_in_a_middle_record_of_the_last_segment_is_corruption(
        tmp_path_factory, payloads, data) -> None:
    """A bad record followed by valid ones is damage to acknowledged data, not a torn tail:
    recovery names the segment and offset and cuts nothing."""
    directory = tmp_path_factory.mktemp("wal")
    write_log(directory, payloads)
    segment = last_segment(directory)
    raw = bytearray(segment.read_bytes())
    victim = data.draw(st.integers(0, len(payloads) - 2))  # any record but the last
    start = wal.HEADER_SIZE + sum(wal.RECORD_OVERHEAD + len(p) for p in payloads[:victim])
    position = data.draw(st.integers(start, start + wal.RECORD_OVERHEAD + len(payloads[victim]) - 1))
    raw[position] ^= 1 << data.draw(st.integers(0, 7))
    segment.write_bytes(bytes(raw))
    for repair in (False, True):
        with pytest.raises(CorruptData, match=f"at byte {start} of segment 1"):
            list(read_wal(str(directory), repair=repair))
    with pytest.raises(CorruptData, match=f"at byte {start} of segment 1"):
        WalWriter(str(directory), fsync="off")
    assert segment.read_bytes() == bytes(raw)  # untouched


def test_garbage_after_a_torn_record_is_still_a_torn_tail(tmp_path: Path) -> None:
    """Zeros or random bytes after the last good record hold no valid record: cut them."""
    write_log(tmp_path, [b"one", b"two"])
    segment = last_segment(tmp_path)
    good = segment.stat().st_size
    with open(segment, "ab") as f:
        f.write(bytes(4096) + os.urandom(4096))
    assert payloads_of(tmp_path) == [b"one", b"two"]
    assert segment.stat().st_size == good


# --- preallocated segments -----------------------------------------------------------------------


def test_preallocated_segments_end_in_zeros_that_read_as_a_clean_end(tmp_path: Path) -> None:
    """With preallocate, the segment being written is allocated ahead of its records (zeros);
    a sealed one is trimmed to its records. Reading and reopening cut nothing, and appends
    go on right after the last record, not after the zeros."""
    payloads = [b"record %d " % i * 20 for i in range(12)]  # about 200 bytes each
    with WalWriter(str(tmp_path), segment_bytes=1024, fsync="always", preallocate=True) as writer:
        for p in payloads:
            writer.append(p)
        tail, used = writer.tail()
        assert tail == writer.segments()[-1] and used < 1024
        sizes = writer.segment_sizes()  # what the log uses: the tail's records, not its zeros
    assert list(sizes) == sorted(int(p.stem) for p in tmp_path.glob("*.wal")) and sizes[tail] == used
    assert all(sizes[int(p.stem)] == p.stat().st_size for p in tmp_path.glob("*.wal") if int(p.stem) != tail)
    *sealed, last = sorted(tmp_path.glob("*.wal"))
    size = last.stat().st_size
    assert sealed and size > used + (1 << 19) and last.read_bytes()[used:] == bytes(size - used)
    for segment in sealed:  # trimmed: a header and whole records, no zeros
        records = [r for r in read_wal(str(tmp_path)) if r.segment_id == int(segment.stem)]
        assert segment.stat().st_size == records[-1].offset + len(records[-1].payload)
    assert payloads_of(tmp_path) == payloads
    assert last.stat().st_size == size  # reading did not cut the zeros
    with WalWriter(str(tmp_path), segment_bytes=1024, fsync="always", preallocate=True) as writer:
        assert writer.tail() == (tail, used)
        assert writer.append(b"after reopening") == len(payloads) + 1
    assert payloads_of(tmp_path) == [*payloads, b"after reopening"]


def test_a_segment_is_trimmed_when_sealed_even_by_a_writer_that_does_not_preallocate(tmp_path: Path) -> None:
    with WalWriter(str(tmp_path), segment_bytes=1024, fsync="always", preallocate=True) as writer:
        writer.append(b"a" * 300)
        _, used = writer.tail()
    first = last_segment(tmp_path)
    assert first.stat().st_size > used
    with WalWriter(str(tmp_path), segment_bytes=1024, fsync="always") as writer:
        for _ in range(4):  # the third no longer fits: the first segment is sealed
            writer.append(b"b" * 300)
        assert len(writer.segments()) == 2
    assert first.stat().st_size == used + 2 * (wal.RECORD_OVERHEAD + 300)
    assert payloads_of(tmp_path) == [b"a" * 300] + [b"b" * 300] * 4


def test_a_torn_record_in_preallocated_space_is_cut_and_the_zeros_come_back(tmp_path: Path) -> None:
    with WalWriter(str(tmp_path), segment_bytes=4096, fsync="always", preallocate=True) as writer:
        writer.append(b"one")
        writer.append(b"two")
        _, used = writer.tail()
    segment = last_segment(tmp_path)
    with open(segment, "r+b") as f:  # a record whose payload never fully reached the disk
        f.seek(used)
        f.write((100).to_bytes(4, "little") + b"\x01\x02\x03\x04" + b"partial")
    with WalWriter(str(tmp_path), segment_bytes=4096, fsync="always", preallocate=True) as writer:
        assert writer.tail()[1] == used
        assert writer.append(b"three") == 3
        end = writer.tail()[1]
    assert payloads_of(tmp_path) == [b"one", b"two", b"three"]
    assert segment.stat().st_size > end and segment.read_bytes()[end:] == bytes(segment.stat().st_size - end)


def test_a_valid_record_beyond_zeros_is_still_corruption(tmp_path: Path) -> None:
    """Zeros end a segment only when nothing but zeros follows: a complete record further on
    means the zeros replaced acknowledged records (damage), which recovery must not cut."""
    with WalWriter(str(tmp_path), segment_bytes=4096, fsync="always", preallocate=True) as writer:
        for p in (b"one", b"two", b"three"):
            writer.append(p)
    segment = last_segment(tmp_path)
    raw = bytearray(segment.read_bytes())
    second = wal.HEADER_SIZE + wal.RECORD_OVERHEAD + 3
    raw[second:second + wal.RECORD_OVERHEAD + 3] = bytes(wal.RECORD_OVERHEAD + 3)  # "two" zeroed
    segment.write_bytes(bytes(raw))
    with pytest.raises(CorruptData, match=f"at byte {second} of segment 1"):
        list(read_wal(str(tmp_path)))
    assert segment.read_bytes() == bytes(raw)


def test_zeros_after_the_records_of_a_sealed_segment_are_a_clean_end(tmp_path: Path) -> None:
    """A segment sealed before its trim reached the disk keeps its zeros: still whole."""
    payloads = [b"x" * 300 for _ in range(8)]
    write_log(tmp_path, payloads, segment_bytes=1024)
    first = sorted(tmp_path.glob("*.wal"))[0]
    with open(first, "ab") as f:
        f.write(bytes(2048))
    assert payloads_of(tmp_path) == payloads


def test_repair_false_leaves_the_file_alone(tmp_path: Path) -> None:
    write_log(tmp_path, [b"one", b"two"])
    segment = last_segment(tmp_path)
    os.truncate(segment, segment.stat().st_size - 1)
    size = segment.stat().st_size
    assert payloads_of(tmp_path, repair=False) == [b"one"]
    assert segment.stat().st_size == size


def test_a_bad_record_in_an_earlier_segment_is_corruption(tmp_path: Path) -> None:
    write_log(tmp_path, [b"%03d" % i * 10 for i in range(20)], segment_bytes=128)
    first = sorted(tmp_path.glob("*.wal"))[0]
    raw = bytearray(first.read_bytes())
    raw[wal.HEADER_SIZE + wal.RECORD_OVERHEAD + 2] ^= 0x10
    first.write_bytes(bytes(raw))
    with pytest.raises(CorruptData):
        list(read_wal(str(tmp_path)))


def test_a_bad_header_is_corruption(tmp_path: Path) -> None:
    write_log(tmp_path, [b"x"])
    segment = last_segment(tmp_path)
    raw = bytearray(segment.read_bytes())
    raw[17] ^= 1  # first_lsn
    segment.write_bytes(bytes(raw))
    with pytest.raises(CorruptData):
        list(read_wal(str(tmp_path)))
    # The writer checks every segment's header when it opens the log.
    with pytest.raises(CorruptData):
        WalWriter(str(tmp_path))


def test_a_missing_segment_is_corruption(tmp_path: Path) -> None:
    write_log(tmp_path, [b"%03d" % i * 10 for i in range(20)], segment_bytes=128)
    segments = sorted(tmp_path.glob("*.wal"))
    assert len(segments) >= 3
    segments[1].unlink()
    with pytest.raises(CorruptData):
        list(read_wal(str(tmp_path)))


def test_a_segment_torn_while_being_created_gets_a_fresh_header(tmp_path: Path) -> None:
    write_log(tmp_path, [b"abc"] * 5, segment_bytes=64)
    segment = last_segment(tmp_path)
    segment_id = int(segment.name.split(".")[0])
    expected = payloads_of(tmp_path)[: segment_id - 1]
    os.truncate(segment, 10)
    assert payloads_of(tmp_path) == expected
    with WalWriter(str(tmp_path), segment_bytes=64) as writer:
        assert writer.append(b"new") == segment_id


def test_append_many_is_all_or_nothing_after_a_tear(tmp_path: Path) -> None:
    with WalWriter(str(tmp_path), fsync="off") as writer:
        writer.append(b"before")
        assert writer.append_many([b"b1", b"b2", b"b3"]) == 4
    segment = last_segment(tmp_path)
    # Cut inside the last record of the batch: the whole batch goes.
    os.truncate(segment, segment.stat().st_size - 1)
    assert payloads_of(tmp_path) == [b"before"]
    with WalWriter(str(tmp_path)) as writer:
        assert writer.append(b"after") == 2


def test_a_batch_never_spans_segments(tmp_path: Path) -> None:
    with WalWriter(str(tmp_path), segment_bytes=100, fsync="off") as writer:
        writer.append(b"x" * 30)
        writer.append_many([b"y" * 30] * 5)  # bigger than a segment: gets its own
        writer.append(b"z")
        assert writer.segments() == [1, 2, 7]
    assert payloads_of(tmp_path) == [b"x" * 30] + [b"y" * 30] * 5 + [b"z"]


# --- policies, threads and lifecycle -----------------------------------------------------------


@pytest.mark.parametrize("policy", ["always", "interval", "off"])
def test_concurrent_appenders_get_distinct_contiguous_lsns(tmp_path: Path, policy: str) -> None:
    results: dict[int, bytes] = {}
    lock = threading.Lock()

    def appender(thread: int) -> None:
        for i in range(50):
            payload = b"t%d-%d" % (thread, i)
            lsn = writer.append(payload)
            with lock:
                results[lsn] = payload

    with WalWriter(str(tmp_path), fsync=policy, interval_ms=2, segment_bytes=2048) as writer:
        threads = [threading.Thread(target=appender, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert writer.durable_lsn >= 400
        if policy == "always":
            assert writer.synced_lsn >= 400
    assert sorted(results) == list(range(1, 401))
    assert {r.lsn: r.payload for r in read_wal(str(tmp_path))} == results


def test_one_batch_is_one_write_and_one_fsync(tmp_path: Path) -> None:
    with WalWriter(str(tmp_path)) as writer:
        writer.append_many([b"r%d" % i for i in range(50)])
        stats = writer.stats()
        assert (stats["records"], stats["batches"], stats["fsyncs"]) == (50, 1, 1)


def test_a_large_batch_does_not_keep_its_buffer(tmp_path: Path) -> None:
    """A node runs one writer per shard: each keeping the buffer of its largest batch (a
    compaction's 4 MiB relocation record) would pin tens of MB per node for good."""
    with WalWriter(str(tmp_path), segment_bytes=64 << 20) as writer:
        writer.append(b"x" * (4 << 20))
        writer.append(b"small")
        assert writer.stats()["buffer_bytes"] <= 1 << 20
        assert [r.payload[:5] for r in read_wal(str(tmp_path))] == [b"xxxxx", b"small"]


def test_submit_then_wait(tmp_path: Path) -> None:
    with WalWriter(str(tmp_path)) as writer:
        lsns = [writer.submit(b"%d" % i) for i in range(100)]
        writer.wait(lsns[-1])
        assert writer.durable_lsn >= 100
        with pytest.raises(ValueError):
            writer.wait(101)
    assert len(payloads_of(tmp_path)) == 100


def test_submit_located_agrees_with_locate_and_wake_writes_it(tmp_path: Path) -> None:
    with WalWriter(str(tmp_path), segment_bytes=128, fsync="off") as writer:
        located = [writer.submit_located(b"%d" % i * 7, False) for i in range(20)]
        writer.wake()
        assert [lsn for lsn, _, _ in located] == list(range(1, 21))
        assert all(writer.locate(lsn) == (seg, off) for lsn, seg, off in located)
        # wait() on a record submitted without waking the writer wakes it too.
        lsn, _, _ = writer.submit_located(b"last", False)
        writer.wait(lsn)
        assert writer.durable_lsn == 21
    on_disk = {r.lsn: (r.segment_id, r.offset) for r in read_wal(str(tmp_path))}
    assert {lsn: on_disk[lsn] for lsn in range(1, 21)} == {
        lsn: (seg, off) for lsn, seg, off in located}


def test_sync_under_the_off_policy(tmp_path: Path) -> None:
    with WalWriter(str(tmp_path), fsync="off") as writer:
        writer.append(b"a")
        writer.sync()
        assert writer.synced_lsn == 1


def test_interval_policy_syncs_when_idle(tmp_path: Path) -> None:
    with WalWriter(str(tmp_path), fsync="interval", interval_ms=1) as writer:
        writer.append(b"a")
        writer.sync()
        assert writer.synced_lsn == 1


def test_close_is_idempotent_and_final(tmp_path: Path) -> None:
    writer = WalWriter(str(tmp_path))
    writer.submit(b"queued")
    writer.close()
    writer.close()
    with pytest.raises(StoreClosed):
        writer.append(b"late")
    assert payloads_of(tmp_path) == [b"queued"]


def test_truncate_before_deletes_whole_old_segments(tmp_path: Path) -> None:
    with WalWriter(str(tmp_path), segment_bytes=100, fsync="off") as writer:
        for i in range(1, 31):
            writer.append(b"%02d" % i * 8)
        segments = writer.segments()
        assert len(segments) > 3
        cut = segments[2] + 1
        assert writer.truncate_before(cut) == 2
        assert writer.segments() == segments[2:]
        assert writer.truncate_before(cut) == 0
        with pytest.raises(KeyError):
            writer.locate(segments[2] - 1)
        assert writer.locate(30)[0] == segments[-1]
        # Never the segment being written.
        writer.truncate_before(10**9)
        assert writer.segments() == segments[-1:]
    assert [r.lsn for r in read_wal(str(tmp_path))][-1] == 30


def test_sync_under_fsync_off_covers_the_segments_sealed_before_it(tmp_path: Path) -> None:
    """sync() fdatasyncs the segment being written; a replica's storage (fsync off) relies
    on it for every record before, so each sealed segment was fdatasync'd when it rolled."""
    with WalWriter(str(tmp_path), segment_bytes=4096, fsync="off") as writer:
        for i in range(80):
            writer.append(b"%04d" % i * 100)
        assert writer.stats()["fsyncs"] == 0
        writer.sync()
        sealed = len(writer.segments()) - 1
        assert sealed >= 5
        stats = writer.stats()
        assert (stats["seal_fsyncs"], stats["fsyncs"]) == (sealed, 1)
