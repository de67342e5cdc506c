"""Compaction reclaims dead space, keeps every live version, and never loses a concurrent commit."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

from pykv.storage import ABSENT, Storage, Update
from pykv.storage.maintenance import Maintainer


def overwrite_rounds(store: Storage, keys: int, rounds: int, size: int = 300) -> dict[bytes, bytes]:
    latest = {}
    for rnd in range(rounds):
        batch = []
        for i in range(keys):
            key = b"k%04d" % i
            latest[key] = bytes([rnd % 256, i % 256]) * (size // 2)
            batch.append(Update(key, latest[key], b"r%d" % rnd, rnd))
        store.commit(batch)
    return latest


def test_compaction_deletes_old_segments_and_keeps_every_live_value(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    calls = []
    with Storage.open(path, segment_bytes=16 << 10, compaction=False) as store:
        stable = {b"stable%d" % i: b"s%d" % i * 50 for i in range(10)}  # in the oldest segment
        store.commit([Update(k, v, b"", 0) for k, v in stable.items()])
        latest = overwrite_rounds(store, keys=40, rounds=30)
        latest.update(stable)
        store.commit([Update(b"k0003", None, b"", 0)])
        del latest[b"k0003"]
        before = store.stats()
        stats = store.compact(progress=lambda phase, done, total: calls.append((phase, done, total)))
        after = store.stats()
        assert stats.segments and stats.bytes_reclaimed > 0 and not stats.aborted
        assert len(stable) <= stats.keys_moved <= len(latest)
        assert min(after["segments"]) > max(stats.segments)
        assert after["dead_bytes"] < before["dead_bytes"] / 4
        assert after["live_bytes"] == before["live_bytes"] == sum(map(len, latest.values()))
        assert {k: v.value for k, v in store.scan()} == latest
        assert calls and calls[-1][0] == "compact" and calls[-1][1] == calls[-1][2]
    with Storage.open(path, compaction=False) as store:
        assert {k: v.value for k, v in store.scan()} == latest
        assert store.get(b"k0003") == ABSENT
        assert store.get(b"k0001").clock == b"r29"


def test_compaction_neither_holds_nor_caches_the_values_it_copies(tmp_path: Path) -> None:
    """Copied values are cold: once their record is written they leave memory, and they do
    not push the values readers use out of the read cache."""
    path = str(tmp_path / "db")
    cold = {b"cold%03d" % i: b"c%03d" % i * 100 for i in range(200)}
    with Storage.open(path, segment_bytes=16 << 10, compaction=False) as store:
        store.commit([Update(k, v, b"", 0) for k, v in cold.items()])
        overwrite_rounds(store, keys=40, rounds=30)
    with Storage.open(path, segment_bytes=16 << 10, compaction=False) as store:  # cache empty
        hot = {key: store.get(key).value for key in (b"k%04d" % i for i in range(40))}
        cached = store.stats()["cache_entries"]
        stats = store.compact()
        assert stats.keys_moved >= len(cold)
        after = store.stats()
        assert after["pending_values"] == 0
        assert after["cache_entries"] == cached == len(hot)
        assert {k: store.get(k).value for k in hot} == hot
        assert store.stats()["cache_misses"] == after["cache_misses"]  # all hits
        assert {k: store.get(k).value for k in cold} == cold


def test_compaction_keeps_the_version_lsn_clock_and_timestamp(tmp_path: Path) -> None:
    with Storage.open(str(tmp_path / "db"), segment_bytes=4096, compaction=False) as store:
        lsn = store.commit([Update(b"stable", b"v" * 100, b"clock", 77)])
        overwrite_rounds(store, keys=10, rounds=20)
        before = store.get(b"stable")
        store.compact()
        assert store.get(b"stable") == before
        assert before.lsn == lsn and before.timestamp == 77 and before.clock == b"clock"


def test_compacting_a_single_segment_does_nothing(tmp_path: Path) -> None:
    with Storage.open(str(tmp_path / "db"), compaction=False) as store:
        store.commit([Update(b"k", b"v", b"", 0)])
        assert store.compact().segments == []
        assert store.get(b"k").value == b"v"


def test_commits_and_reads_during_compaction_are_never_lost(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    keys = [b"key%03d" % i for i in range(60)]
    latest: dict[bytes, bytes] = {}
    stop = threading.Event()
    errors: list[BaseException] = []
    with Storage.open(path, segment_bytes=8 << 10, compaction=False) as store:
        def writer() -> None:
            rng = random.Random(1)
            n = 0
            while not stop.is_set() or n < 500:
                key = rng.choice(keys)
                value = key + b"=%d;" % n * rng.randint(1, 40)
                store.commit([Update(key, value, b"%d" % n, n)])
                latest[key] = value  # one writer: its commit order is the final order
                n += 1

        def reader() -> None:
            rng = random.Random(2)
            try:
                while not stop.is_set():
                    key = rng.choice(keys)
                    got = store.get(key).value
                    assert got is None or got.startswith(key + b"="), got[:40]
            except BaseException as exc:
                errors.append(exc)

        workers = [threading.Thread(target=writer), threading.Thread(target=reader),
                   threading.Thread(target=reader)]
        for worker in workers:
            worker.start()
        compactions = 0
        while compactions < 8 or len(latest) < len(keys):
            if store.compact().segments:
                compactions += 1
        stop.set()
        for worker in workers:
            worker.join()
        assert not errors, errors[0]
        assert {k: v.value for k, v in store.scan()} == latest
    with Storage.open(path, compaction=False) as store:
        assert {k: v.value for k, v in store.scan()} == latest


def test_background_compaction_runs_on_its_own(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    calls = []
    with Storage.open(path, segment_bytes=8 << 10, compaction=True, compaction_interval=0.01,
                      progress=lambda *call: calls.append(call)) as store:
        latest = overwrite_rounds(store, keys=20, rounds=60)
        deadline = time.monotonic() + 30
        while store.stats()["compactions"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = store.stats()
        assert stats["compactions"] >= 1 and stats["background_error"] is None
        assert any(phase == "compact" for phase, _, _ in calls)
        assert min(stats["segments"]) > 1
        assert {k: v.value for k, v in store.scan()} == latest
    with Storage.open(path, compaction=False) as store:
        assert {k: v.value for k, v in store.scan()} == latest


def test_many_stores_are_compacted_by_one_shared_maintenance_thread(tmp_path: Path) -> None:
    """A node's shards share one Maintainer: one thread, however many stores, and each
    store still gets compacted; a closed store leaves it."""
    maintainer = Maintainer(interval=0.01, name="test-maintenance")
    stores = [
        Storage.open(str(tmp_path / f"s{i}"), segment_bytes=8 << 10, maintainer=maintainer)
        for i in range(4)
    ]
    try:
        names = [t.name for t in threading.enumerate()]
        assert names.count("test-maintenance") == 1
        assert not any(name.startswith("pykv-storage-bg") and str(tmp_path) in name for name in names)
        latest = [overwrite_rounds(store, keys=20, rounds=60) for store in stores]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(
            store.stats()["compactions"] for store in stores
        ):
            time.sleep(0.01)
        for store, expected in zip(stores, latest, strict=True):
            stats = store.stats()
            assert stats["compactions"] >= 1 and stats["background_error"] is None
            assert {k: v.value for k, v in store.scan()} == expected
    finally:
        for store in stores:
            store.close()
        assert len(maintainer) == 0
        maintainer.close()
    assert "test-maintenance" not in [t.name for t in threading.enumerate()]
