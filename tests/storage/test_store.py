"""Storage behaviour a caller relies on: versions, atomic commits, scans, reopen, locking, errors."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pykv.codec import encode_value
from pykv.errors import (
    InvalidKey,
    InvalidValue,
    KeyTooLarge,
    LimitError,
    StoreClosed,
    StoreLocked,
)
from pykv.storage import ABSENT, Storage, StoredVersion, Update

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path: Path):
    with Storage.open(str(tmp_path / "db"), compaction=False) as opened:
        yield opened


def test_absent_key_reads_as_the_empty_version(store: Storage) -> None:
    assert store.get(b"nope") == StoredVersion(None, b"", 0, 0) == ABSENT


def test_commit_returns_a_durable_lsn_and_get_returns_value_clock_timestamp(store: Storage) -> None:
    value = encode_value("hello")
    lsn = store.commit([Update(b"k", value, b"\x01\x02", 1234)])
    assert lsn == store.last_lsn and store.durable_lsn >= lsn
    assert store.get(b"k") == StoredVersion(value, b"\x01\x02", 1234, lsn)


def test_a_commit_applies_all_its_updates_with_one_lsn(store: Storage) -> None:
    store.commit([Update(b"gone", b"x", b"", 1)])
    lsn = store.commit([Update(b"a", b"1", b"ca", 5), Update(b"b", b"2", b"cb", 6),
                        Update(b"gone", None, b"", 7)])
    assert store.get(b"a") == StoredVersion(b"1", b"ca", 5, lsn)
    assert store.get(b"b") == StoredVersion(b"2", b"cb", 6, lsn)
    assert store.get(b"gone") == ABSENT


def test_a_delete_with_a_clock_leaves_a_tombstone_that_keeps_it(store: Storage) -> None:
    store.commit([Update(b"k", b"v", b"c1", 1), Update(b"other", b"o", b"c", 1)])
    lsn = store.commit([Update(b"k", None, b"c2", 2), Update(b"never", None, b"c9", 9)])
    assert store.get(b"k") == StoredVersion(None, b"c2", 2, lsn)
    assert store.get(b"never") == StoredVersion(None, b"c9", 9, lsn)  # deleting an absent key
    assert [k for k, _ in store.scan()] == [b"other"]  # scans skip tombstones
    assert (store.stats()["keys"], store.stats()["tombstones"]) == (1, 2)
    again = store.commit([Update(b"k", b"back", b"c3", 3)])
    assert store.get(b"k") == StoredVersion(b"back", b"c3", 3, again)
    assert (store.stats()["keys"], store.stats()["tombstones"]) == (2, 1)


def test_a_delete_without_a_clock_forgets_the_key(store: Storage) -> None:
    store.commit([Update(b"k", b"v", b"c1", 1)])
    store.commit([Update(b"k", None, b"", 5)])
    assert store.get(b"k") == ABSENT
    assert (store.stats()["keys"], store.stats()["tombstones"]) == (0, 0)


def test_tombstones_survive_reopen_checkpoint_and_compaction(tmp_path: Path) -> None:
    """The WAL segments holding the deletes are gone after compaction: the hint keeps them."""
    path = str(tmp_path / "db")
    with Storage.open(path, segment_bytes=2048, compaction=False) as store:
        for i in range(20):
            store.commit([Update(b"k%02d" % i, b"x" * 200, b"put%d" % i, i)])
        deleted = {i: store.commit([Update(b"k%02d" % i, None, b"del%d" % i, 100 + i)])
                   for i in range(0, 20, 2)}
        for i in range(60):  # push the deletes into old segments
            store.commit([Update(b"filler", b"y" * 200, b"", i)])
        store.compact()
        assert min(store.stats()["segments"]) > max(deleted.values())
    for _ in range(2):  # once from the hint, once after replaying nothing
        with Storage.open(path, compaction=False) as store:
            for i in range(20):
                got = store.get(b"k%02d" % i)
                if i in deleted:
                    assert got == StoredVersion(None, b"del%d" % i, 100 + i, deleted[i])
                else:
                    assert got.value == b"x" * 200 and got.clock == b"put%d" % i
            assert store.stats()["tombstones"] == len(deleted)
            assert len(list(store.scan(prefix=b"k"))) == 10


def test_later_update_of_the_same_key_in_one_commit_wins(store: Storage) -> None:
    store.commit([Update(b"k", b"first", b"", 1), Update(b"k", b"second", b"", 2)])
    assert store.get(b"k").value == b"second"
    assert store.stats()["keys"] == 1


def test_submitted_versions_are_visible_before_durable_and_wait_makes_them_durable(store: Storage) -> None:
    lsns = [store.submit([Update(b"k%d" % i, b"v%d" % i, b"", i)]) for i in range(50)]
    assert lsns == sorted(lsns) and len(set(lsns)) == 50
    assert all(store.get(b"k%d" % i).value == b"v%d" % i for i in range(50))
    store.wait_durable(lsns[-1])
    assert store.durable_lsn >= lsns[-1]


def test_empty_and_large_values_round_trip(store: Storage) -> None:
    big = os.urandom(1 << 20)
    store.commit([Update(b"empty", b"", b"", 0), Update(b"big", big, b"", 0)])
    assert store.get(b"empty").value == b""
    assert store.get(b"big").value == big


def test_scan_is_in_key_order_with_prefix_bounds_and_limit(store: Storage) -> None:
    keys = [b"a", b"b/1", b"b/2", b"b/3", b"b0", b"c"]
    store.commit([Update(k, k.upper(), b"", 0) for k in reversed(keys)])
    assert [k for k, _ in store.scan()] == keys
    assert [k for k, _ in store.scan(prefix=b"b/")] == [b"b/1", b"b/2", b"b/3"]
    assert [k for k, _ in store.scan(prefix=b"b/", start=b"b/2")] == [b"b/2", b"b/3"]
    assert [k for k, _ in store.scan(start=b"b/2", end=b"c")] == [b"b/2", b"b/3", b"b0"]
    assert [k for k, _ in store.scan(limit=2)] == [b"a", b"b/1"]
    assert [v.value for _, v in store.scan(prefix=b"c")] == [b"C"]
    store.commit([Update(b"b/2", None, b"", 0)])
    assert [k for k, _ in store.scan(prefix=b"b/")] == [b"b/1", b"b/3"]


def test_scan_walks_more_keys_than_one_batch(store: Storage) -> None:
    keys = [b"key%05d" % i for i in range(1000)]
    store.commit([Update(k, k, b"", 0) for k in keys])
    assert [k for k, _ in store.scan(prefix=b"key")] == keys
    assert len(list(store.scan(start=b"key00500", limit=700))) == 500


def test_everything_survives_close_and_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    with Storage.open(path, segment_bytes=4096, compaction=False) as store:
        for i in range(300):
            store.commit([Update(b"k%03d" % (i % 50), b"v%d" % i, b"c%d" % i, i)])
        store.commit([Update(b"k007", None, b"", 0)])
        before = list(store.scan())
        node = store.node_id()
    with Storage.open(path, compaction=False) as store:
        assert list(store.scan()) == before
        assert store.node_id() == node
        assert store.get(b"k007") == ABSENT


def test_reopen_without_checkpoint_replays_the_wal(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    code = (
        "import os\n"
        "from pykv.storage import Storage, Update\n"
        f"s = Storage.open({path!r}, compaction=False)\n"
        "for i in range(100): s.commit([Update(b'k%d' % i, b'v%d' % i, b'c', i)])\n"
        "os._exit(0)\n"  # no close(), so no final checkpoint
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=_env())
    assert not os.path.exists(os.path.join(path, "hint"))
    calls = []
    with Storage.open(path, compaction=False, progress=lambda *call: calls.append(call)) as store:
        assert calls == [("replay", 100, 100)]
        assert store.last_lsn == 100
        assert [v.value for _, v in store.scan()] == sorted(b"v%d" % i for i in range(100))
        assert store.get(b"k42") == StoredVersion(b"v42", b"c", 42, 43)


def test_close_without_checkpoint_keeps_the_last_hint_and_reopen_replays_after_it(tmp_path: Path) -> None:
    """close(checkpoint=False) leaves the store as a crash does (the simulator's crashes)."""
    path = str(tmp_path / "db")
    store = Storage.open(path, compaction=False)
    for i in range(10):
        store.commit([Update(b"k%d" % i, b"v%d" % i, b"c", i)])
    store.checkpoint()
    for i in range(10, 15):
        store.commit([Update(b"k%d" % i, b"v%d" % i, b"c", i)])
    store.close(checkpoint=False)
    calls = []
    with Storage.open(path, compaction=False, progress=lambda *call: calls.append(call)) as store:
        assert store.stats()["checkpoint_lsn"] == 10
        assert ("replay", 5, 5) in calls
        assert len(list(store.scan())) == 15


def test_maintenance_checkpoints_every_checkpoint_bytes_so_a_reopen_replays_little(tmp_path: Path) -> None:
    """A replica's storage is checkpointed by its maintainer alone: every checkpoint_bytes of
    WAL, which is then the most a restart replays."""
    path = str(tmp_path / "db")
    store = Storage.open(path, segment_bytes=1 << 20, checkpoint_bytes=16 << 10, compaction=False)
    for i in range(200):  # about 40 KiB of WAL
        store.commit([Update(b"k%d" % (i % 20), b"v" * 150, b"", i)])
        if i % 10 == 9:
            store.maintain()  # a round of the background thread
    checkpoint_lsn = store.stats()["checkpoint_lsn"]
    assert 200 - 16 * 1024 // 180 <= checkpoint_lsn < 200  # a record costs ~180 bytes
    store.close(checkpoint=False)
    calls = []
    with Storage.open(path, compaction=False, progress=lambda *call: calls.append(call)) as reopened:
        replayed = [done for phase, done, total in calls if phase == "replay" and done == total]
        assert replayed == [200 - checkpoint_lsn]
        assert len(list(reopened.scan())) == 20


def test_checkpoint_then_more_commits_then_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    with Storage.open(path, segment_bytes=2048, compaction=False) as store:
        for i in range(100):
            store.commit([Update(b"k%d" % (i % 10), b"v%d" % i, b"", i)])
        store.checkpoint()
        assert store.stats()["checkpoint_lsn"] == 100
        # Values of the first segments are all overwritten: the checkpoint deleted them.
        assert min(store.stats()["segments"]) > 1
        store.commit([Update(b"k1", None, b"", 0), Update(b"new", b"n", b"", 0)])
        expected = list(store.scan())
    with Storage.open(path, compaction=False) as store:
        assert list(store.scan()) == expected


def test_node_id_is_stable_and_random(tmp_path: Path) -> None:
    ids = []
    for name in ("a", "b"):
        with Storage.open(str(tmp_path / name), compaction=False) as store:
            ids.append(store.node_id())
        with Storage.open(str(tmp_path / name), compaction=False) as store:
            assert store.node_id() == ids[-1]
    assert ids[0] != ids[1] and all(i > 0 for i in ids)


def test_a_second_process_gets_store_locked(tmp_path: Path, store: Storage) -> None:
    code = (
        "from pykv.errors import StoreLocked\n"
        "from pykv.storage import Storage\n"
        "try:\n"
        f"    Storage.open({store.path!r})\n"
        "except StoreLocked as exc:\n"
        "    print('locked:', exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_env(), check=True).stdout
    assert out.startswith("locked:") and str(os.getpid()) in out


def test_a_second_open_in_the_same_process_is_locked_until_close(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    first = Storage.open(path, compaction=False)
    with pytest.raises(StoreLocked):
        Storage.open(path, compaction=False)
    first.close()
    Storage.open(path, compaction=False).close()


def test_close_is_idempotent_and_use_after_close_raises(tmp_path: Path) -> None:
    store = Storage.open(str(tmp_path / "db"), compaction=False)
    store.commit([Update(b"k", b"v", b"", 0)])
    store.close()
    store.close()
    with pytest.raises(StoreClosed):
        store.get(b"k")
    with pytest.raises(StoreClosed):
        store.commit([Update(b"k", b"v", b"", 0)])


@pytest.mark.parametrize(
    ("update", "error"),
    [
        (Update("str-key", b"v", b"", 0), InvalidKey),  # type: ignore[arg-type]
        (Update(b"", b"v", b"", 0), KeyTooLarge),
        (Update(b"x" * 257, b"v", b"", 0), KeyTooLarge),
        (Update(b"k", "not bytes", b"", 0), InvalidValue),  # type: ignore[arg-type]
        (Update(b"k", b"v", None, 0), InvalidValue),  # type: ignore[arg-type]
        (Update(b"k", b"v", b"", -1), InvalidValue),
        (Update(b"k", b"v", b"", 1 << 64), InvalidValue),
        (Update(b"k", b"v", b"c" * 2000, 0), LimitError),
        (("k", b"v", b"", 0), InvalidValue),
    ],
)
def test_bad_updates_raise_before_anything_is_written(store: Storage, update, error) -> None:
    store.commit([Update(b"ok", b"1", b"", 0)])
    last = store.last_lsn
    with pytest.raises(error):
        store.commit([Update(b"other", b"2", b"", 0), update])
    assert store.last_lsn == last and store.get(b"other") == ABSENT
    assert store.commit([Update(b"ok", b"3", b"", 0)]) == last + 1


def test_many_threads_share_fsyncs_and_every_commit_lands(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    threads, per_thread = 8, 60
    with Storage.open(path, compaction=False) as store:
        def worker(t: int) -> None:
            for i in range(per_thread):
                lsn = store.commit([Update(b"t%d-%d" % (t, i), b"v%d" % i, b"", i)])
                assert store.durable_lsn >= lsn

        pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
        assert store.last_lsn == threads * per_thread
    with Storage.open(path, compaction=False) as store:
        assert store.stats()["keys"] == threads * per_thread
        assert store.get(b"t7-59").value == b"v59"


def test_reads_are_served_from_the_bounded_cache(tmp_path: Path) -> None:
    with Storage.open(str(tmp_path / "db"), cache_bytes=64 << 10, compaction=False) as store:
        for i in range(200):
            store.commit([Update(b"k%d" % i, bytes([i]) * 1000, b"", 0)])
        for i in range(200):  # 240 KB through a 64 KiB cache: misses, and it stays bounded
            assert store.get(b"k%d" % i).value == bytes([i]) * 1000
        cold = store.stats()
        assert cold["cache_bytes"] <= 64 << 10 and cold["cache_misses"] > 0
        for _ in range(5):  # a hot set that fits is served from memory
            for i in range(20):
                assert store.get(b"k%d" % i).value == bytes([i]) * 1000
        stats = store.stats()
        assert stats["cache_hits"] - cold["cache_hits"] >= 4 * 20
        assert stats["cache_bytes"] <= 64 << 10
        assert stats["pending_values"] == 0


def test_without_cache_writes_only_keys_cached_already_are_refreshed(tmp_path: Path) -> None:
    """A follower's storage (cache_writes off) keeps what it writes out of the cache, but
    a key it has read back (an increment, an append) stays cached at its newest version."""
    with Storage.open(str(tmp_path / "db"), compaction=False) as store:
        store.cache_writes = False
        store.commit([Update(b"blind", b"b1", b"", 0), Update(b"read", b"r1", b"", 0)])
        store.commit([Update(b"other", b"o", b"", 0)])  # releases the first record's values
        assert store.stats()["cache_entries"] == 0
        assert store.get(b"read").value == b"r1"  # a miss, and now cached
        store.commit([Update(b"read", b"r2", b"", 0), Update(b"blind", b"b2", b"", 0)])
        store.commit([Update(b"other", b"o2", b"", 0)])
        before = store.stats()
        assert store.get(b"read").value == b"r2"
        after = store.stats()
        assert after["cache_hits"] == before["cache_hits"] + 1 and after["cache_entries"] == 1


def test_stats_report_keys_segments_and_memory(store: Storage) -> None:
    store.commit([Update(b"a", b"x" * 100, b"", 0)])
    store.commit([Update(b"a", b"y" * 100, b"", 0)])
    stats = store.stats()
    assert stats["keys"] == 1
    assert stats["live_bytes"] == 100
    assert stats["dead_bytes"] > 100  # the overwritten value and the record framing
    assert stats["keydir_bytes"] > 0 and stats["key_index_bytes"] > 0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def test_close_checkpoints_so_restart_replays_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    with Storage.open(path, compaction=False) as store:
        store.commit([Update(b"k%d" % i, b"v", b"", 0) for i in range(10)])
        store.checkpoint()
        store.commit([Update(b"after", b"v", b"", 0)])
        store.submit([Update(b"unwaited", b"v", b"", 0)])
    calls = []
    with Storage.open(path, compaction=False,
                      progress=lambda phase, done, total: calls.append((phase, done, total))) as store:
        assert store.get(b"unwaited").value == b"v"  # close() flushed the submitted record
    # close() checkpointed everything, so restart loads the hint and replays nothing.
    assert calls == [("hint", 12, 12), ("replay", 0, 0)]


def test_deleting_everything_then_checkpointing_reopens_empty(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    with Storage.open(path, segment_bytes=1024, compaction=False) as store:
        for i in range(20):
            store.commit([Update(b"k%d" % i, b"x" * 300, b"", 0)])
        store.commit([Update(b"k%d" % i, None, b"", 0) for i in range(20)])
        store.checkpoint()
        store.compact()
        assert store.stats()["live_bytes"] == 0
    with Storage.open(path, compaction=False) as store:
        assert list(store.scan()) == []
        lsn = store.commit([Update(b"again", b"v", b"", 0)])
    with Storage.open(path, compaction=False) as store:
        assert store.get(b"again").lsn == lsn


def test_reads_beside_commits_and_compaction_see_every_version_whole(tmp_path: Path) -> None:
    """get() takes no lock when the value is pending or cached: a reader racing writers, a
    cache too small for the values and compactions moving them must still never pair a
    value with another version's clock or timestamp, nor see a key go back in time."""
    writers, readers, keys, rounds = 2, 3, 16, 300
    with Storage.open(str(tmp_path / "db"), cache_bytes=16 << 10, segment_bytes=32 << 10,
                      compaction=False) as store:
        done = threading.Event()
        problems: list[str] = []

        def write(w: int) -> None:
            for n in range(w + 1, rounds * writers, writers):
                key = b"k%d" % (n % keys)
                value = None if n % 7 == 0 else b"%d." % n * 60  # some deletes leave tombstones
                store.commit([Update(key, value, b"c%d" % n, n)])

        def read() -> None:
            newest: dict[bytes, int] = {}
            while not done.is_set():
                for i in range(keys):
                    key = b"k%d" % i
                    version = store.get(key)
                    if version == ABSENT:
                        whole = key not in newest
                    else:
                        n = version.timestamp
                        whole = version.clock == b"c%d" % n and version.value in (None, b"%d." % n * 60)
                        whole = whole and version.lsn >= newest.get(key, 0)
                        newest[key] = version.lsn
                    if not whole:
                        problems.append(f"{key!r}: {version}")

        def compact() -> None:
            while not done.is_set():
                store.maintain()

        pool = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
        background = [threading.Thread(target=read) for _ in range(readers)]
        background.append(threading.Thread(target=compact))
        for thread in pool + background:
            thread.start()
        for thread in pool:
            thread.join()
        done.set()
        for thread in background:
            thread.join()
        assert problems == []
        stats = store.stats()
        assert stats["cache_misses"] > 0 and stats["compactions"] > 0, stats
