"""The sync and asyncio clients against a real cluster: same API, errors that say what happened."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster_harness import free_port_range, local_cluster  # noqa: E402
from forking import in_forked_child  # noqa: E402
from transfers import Transfers  # noqa: E402

import pykv.aio  # noqa: E402
import pykv.client  # noqa: E402
from pykv.api import HybridClock  # noqa: E402
from pykv.client.cluster import settled  # noqa: E402
from pykv.client.transport import PREPARE  # noqa: E402
from pykv.errors import (  # noqa: E402
    Error,
    InvalidOperation,
    KeyLocked,
    KeyTooLarge,
    ScanTooLarge,
    StoreClosed,
    Timeout,
    TransactionAborted,
    TransactionConflict,
    TransactionTooLarge,
    Unavailable,
)
from pykv.replica import shard as cmd  # noqa: E402
from pykv.replica.commitflow import LOCK_RENEW_EVERY, Round, Send  # noqa: E402
from pykv.txn.model import CommitRequest, KeyRange, WriteOp  # noqa: E402
from pykv.types import OpKind, TxnIdSource  # noqa: E402


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with local_cluster(tmp_path_factory.mktemp("clients"), nodes=3, partitions=4) as c:
        yield c


def test_asyncio_backup_keeps_the_loop_serving_while_it_copies(cluster, tmp_path):
    """``await db.backup(path)`` of the asyncio client: the copy holds the keys written
    before it, and other coroutines on the same loop go on committing meanwhile."""

    async def main() -> int:
        db = await pykv.aio.connect(cluster.addresses[:1])
        try:
            for start in range(0, 600, 200):
                async with db.transaction() as tx:
                    for i in range(start, start + 200):
                        tx[f"aiobk{i:03d}"] = b"x" * 5_000
            done = 0

            async def keep_writing() -> None:
                nonlocal done
                while True:
                    await db.incr("aiobk-counter", 1)
                    done += 1

            writer = asyncio.get_running_loop().create_task(keep_writing())
            seen: list[tuple[int, int]] = []
            await db.backup(tmp_path / "copy", progress=lambda d, t: seen.append((d, t)))
            writer.cancel()
            assert seen[-1] == (4, 4)
            return done
        finally:
            await db.close()

    assert asyncio.run(main()) > 0
    with pykv.open(tmp_path / "copy") as copy:
        assert copy.get_many([f"aiobk{i:03d}" for i in range(600)]) == {f"aiobk{i:03d}": b"x" * 5_000 for i in range(600)}


def test_asyncio_client_offers_the_same_api(cluster):
    async def main() -> None:
        db = await pykv.aio.connect(cluster.addresses[2:])
        try:
            await db.put("aio:a", "1")
            assert await db.get("aio:a") == "1"
            assert await db.get("aio:none", "dflt") == "dflt"
            async with db.transaction() as tx:
                tx["aio:b"] = (await tx.get("aio:a")) + "!"
                tx.incr("aio:n", 2)
                assert await tx.get("aio:n") == 2  # reads see the transaction's own writes
            assert await db.get("aio:b") == "1!"
            assert await db.get_many(["aio:b", "aio:none", "aio:a"], 0) == {"aio:b": "1!", "aio:none": 0, "aio:a": "1"}
            async with db.transaction() as tx:
                tx.incr("aio:n", 1)
                assert await tx.get_many(["aio:n", "aio:a"]) == {"aio:n": 3, "aio:a": "1"}
                tx["aio:sum"] = 0
                await db.put("aio:a", "2")  # changes what the transaction read: its commit fails
                with pytest.raises(TransactionConflict):
                    await tx.commit()
            await db.put("aio:a", "1")
            assert await db.get("aio:sum") is None
            calls = []

            async def reader(tx):  # conflicts once, then reruns from one snapshot of a and b
                calls.append(1)
                seen = (await tx.get("aio:a"), await tx.get("aio:b"))
                if len(calls) == 1:
                    await db.put("aio:b", "2!")
                return seen

            assert await db.transact(reader, retries=1) == ("1", "2!") and len(calls) == 2
            txid = db.begin_transaction()
            await db.write(txid, "aio:c", [1, 2])
            assert await db.read(txid, "aio:c") == [1, 2]
            await db.commit_transaction(txid)
            assert await db.get("aio:c") == [1, 2]
            await db.append("aio:c", 3)
            assert await db.get("aio:c") == [1, 2, 3]
            await db.delete("aio:c")
            assert await db.get("aio:c") is None
            assert [k for k, _ in await db.scan("aio:")] == ["aio:a", "aio:b", "aio:n"]
            assert [k async for k, _ in db.scan_iter("aio:", start="aio:b")] == ["aio:b", "aio:n"]

            # Many coroutines on one client at once; transact reruns on conflict.
            await db.put("aio:counter", 0)

            async def bump(tx):
                tx["aio:counter"] = await tx.get("aio:counter") + 1

            await asyncio.gather(*(db.transact(bump) for _ in range(10)))
            assert await db.get("aio:counter") == 10

            stale = db.transaction()
            await stale.get("aio:counter")
            stale["aio:counter"] = -1
            await db.put("aio:counter", 99)
            with pytest.raises(TransactionConflict):
                await stale.commit()
            with pytest.raises(KeyTooLarge):
                await db.get("")
            with pytest.raises(InvalidOperation):
                await db.register_resolver("x", "no-such-resolver")

            async def merged_max() -> int:  # a merge conflict on "aio-max/k": 5 +1 against 9
                await db.put("aio-max/k", 5)
                tx = db.transaction(isolation="merge")
                tx["aio-max/k"] = await tx.get("aio-max/k") + 1
                await db.put("aio-max/k", 9)
                await tx.commit()
                return await db.get("aio-max/k")

            await db.register_resolver("aio-max/", "max")
            assert (await db.resolvers())["aio-max/"] == "max"
            assert await merged_max() == 9
            await db.unregister_resolver("aio-max/")
            assert "aio-max/" not in await db.resolvers()
            with pytest.raises(TransactionConflict):
                await merged_max()
        finally:
            await db.close()

    asyncio.run(main())


def test_asyncio_scans_that_return_a_range_at_once_hold_at_most_max_scan_bytes(cluster):
    """An asyncio scan returns a list, consistent or not: past max_scan_bytes it raises
    ScanTooLarge; scan_iter streams the same range a page at a time, one snapshot of it
    with consistent=True."""
    async def main() -> None:
        db = await pykv.aio.connect(cluster.addresses, max_scan_bytes=2048)
        try:
            keys = [f"aiobig/{i:02d}" for i in range(40)]
            async with db.transaction() as tx:
                for key in keys:
                    tx.put(key, "v" * 100)
            for consistent in (True, False):
                with pytest.raises(ScanTooLarge, match="max_scan_bytes"):
                    await db.scan("aiobig/", consistent=consistent)
            assert [k async for k, _ in db.scan_iter("aiobig/")] == keys
            assert [k async for k, _ in db.scan_iter("aiobig/", consistent=True)] == keys
            assert [k for k, _ in await db.scan("aiobig/", limit=5)] == keys[:5]
        finally:
            await db.close()

    asyncio.run(main())


def test_asyncio_transactions_hold_at_most_max_txn_bytes(cluster):
    async def main() -> None:
        db = await pykv.aio.connect(cluster.addresses, max_txn_bytes=1500)
        assert (db.max_txn_bytes, db.max_txn_ops, db.closed) == (1500, 10_000, False)
        try:
            async with db.transaction() as tx:
                tx.put("aiobytes/a", b"x" * 1000)
                with pytest.raises(TransactionTooLarge, match="max_txn_bytes"):
                    tx.put("aiobytes/b", b"y" * 1000)
            assert (await db.get("aiobytes/a"), await db.get("aiobytes/b")) == (b"x" * 1000, None)
        finally:
            await db.close()
        assert db.closed

    asyncio.run(main())


def test_asyncio_transactions_take_ids_from_one_source(cluster):
    # The replicas remember each transaction id's outcome and answer a repeated id with it,
    # unapplied: so one client's transaction ids must never repeat. They share the client's
    # 24-bit tag and count up; a tag drawn per transaction would let two ids collide.
    async def main() -> None:
        db = await pykv.aio.connect(cluster.addresses)
        try:
            ids = [db.transaction().id for _ in range(100)]
            assert len(set(ids)) == 100
            assert len({txid >> 40 for txid in ids}) == 1
        finally:
            await db.close()

    asyncio.run(main())


def test_asyncio_client_in_a_forked_child_is_refused_not_hung(cluster):
    # The child's copy holds the parent's connections, bound to the parent's event loop.
    async def main() -> None:
        db = await pykv.aio.connect(cluster.addresses)
        try:
            await db.put("forked/k", 1)

            def child() -> object:
                return asyncio.run(db.get("forked/k"))

            said = in_forked_child(child)
            assert said.startswith(f"StoreClosed: this store was opened by process {os.getpid()}")
            assert in_forked_child(lambda: asyncio.run(db.close())) == "returned None"
            assert await db.get("forked/k") == 1  # the parent's connections still serve
        finally:
            await db.close()

    asyncio.run(main())


def test_a_cancelled_asyncio_commit_still_finishes_and_leaves_no_key_locked(cluster):
    # asyncio.wait_for cancels a commit at any point, between prepare and decide too: the
    # commit's rounds run on to their end, so no leader keeps a prepared transaction holding
    # its keys until recovery settles it (2 s later, every writer of them waiting meanwhile).
    from pykv.client.admin import fetch_status

    async def prepared_on_leaders() -> int:
        """Prepared transactions on the leaders, once every coordinator has seen its
        participants apply their FINISH (a coordinator shard's leader sends them)."""
        for _ in range(1000):
            statuses = [await asyncio.to_thread(fetch_status, a) for a in cluster.addresses]
            leaders = [g for s in statuses for g in s["groups"].values() if g["role"] == "leader"]
            if not any(g.get("unfinished", 0) for g in leaders):
                return sum(g.get("prepared", 0) for g in leaders)
            await asyncio.sleep(0.01)
        raise AssertionError("a coordinator never saw its participants finish")

    async def main() -> None:
        db = await pykv.aio.connect(cluster.addresses)
        keys = [f"cancelled/{i}" for i in range(8)]  # over every shard of 4
        rng = random.Random(5)
        try:
            for attempt in range(12):
                tx = db.transaction()
                for key in keys:
                    tx.put(key, attempt)
                with contextlib.suppress(asyncio.TimeoutError, Error):
                    await asyncio.wait_for(tx.commit(), rng.choice([0.0005, 0.001, 0.002, 0.004]))
                while db._core._background:  # the commit's rounds, and its FINISHes
                    await asyncio.sleep(0.001)
                assert await prepared_on_leaders() == 0, f"attempt {attempt}"
            async with db.transaction() as tx:  # and the keys take a write at once
                for key in keys:
                    tx.put(key, "after")
            assert set((await db.get_many(keys)).values()) == {"after"}
        finally:
            await db.close()

    asyncio.run(main())


def test_an_asyncio_client_used_in_another_event_loop_says_so(cluster):
    async def connect() -> pykv.aio.AsyncKeyValueStore:
        db = await pykv.aio.connect(cluster.addresses)
        await db.put("loops/k", 1)
        return db

    # Each asyncio.run() makes a loop of its own; the second one got "Event loop is closed".
    db = asyncio.run(connect())
    with pytest.raises(StoreClosed, match="connected in another event loop"):
        asyncio.run(db.get("loops/k"))


def test_asyncio_by_id_transactions_left_open_are_bounded_as_the_sync_ones(cluster):
    async def main() -> None:
        db = await pykv.aio.connect(cluster.addresses)
        try:
            db.max_open_transactions = 2
            first, second = db.begin_transaction(), db.begin_transaction()
            await db.write(first, "aiolru/a", 1)
            third = db.begin_transaction()
            with pytest.raises(TransactionAborted, match="least recently used of more than 2 open"):
                await db.read(second, "aiolru/a")
            await db.commit_transaction(first)
            await db.commit_transaction(third)
            with pytest.raises(TransactionAborted, match="already committed"):
                await db.commit_transaction(first)
            assert await db.get("aiolru/a") == 1
        finally:
            await db.close()

    asyncio.run(main())


def test_asyncio_scan_is_one_snapshot_while_transfers_run(cluster):
    # The asyncio client drives the same consistent scan (pykv.replica.commitflow.scan_rounds)
    # as the sync one: transfers run meanwhile, and every scan has the full total.
    async def main() -> None:
        db = await pykv.aio.connect(cluster.addresses)
        accounts = [f"aiobank/{i:02d}" for i in range(8)]
        try:
            async with db.transaction() as tx:
                for key in accounts:
                    tx.put(key, 10)

            async def transfers() -> None:
                rng = random.Random(3)
                for _ in range(60):
                    src, dst = rng.sample(accounts, 2)
                    while True:
                        try:
                            async with db.transaction() as tx:
                                tx.put(src, await tx.get(src) - 1)
                                tx.put(dst, await tx.get(dst) + 1)
                            break
                        except pykv.TransactionConflict:
                            continue

            mover = asyncio.get_running_loop().create_task(transfers())
            totals = []
            while not mover.done():
                items = await db.scan("aiobank/")  # never gives up: it locks the range instead
                assert [k for k, _ in items] == accounts
                totals.append(sum(v for _, v in items))
            await mover
            assert totals and set(totals) == {80}
            assert sum(v for _, v in await db.scan("aiobank/", consistent=False)) == 80
        finally:
            await db.close()

    asyncio.run(main())


@pytest.mark.parametrize("reader", ["scan", "get_many"])
def test_a_snapshot_under_steady_transfers_locks_and_sees_one_moment(cluster, reader):
    """Four threads move money between 16 accounts without pause, so passes over them seldom
    agree. A consistent scan then locks the range for one pass, and a get_many the keys
    (writers retry for a moment), so every one returns, and every one has the full total.
    (With only one writer over 12 accounts, a read-only transaction of all of them
    conflicted in 194 of 200 attempts.)"""
    accounts = [f"lockbank-{reader}/{i:02d}" for i in range(16)]
    lock_round = "lock" if reader == "scan" else "lock keys"
    db = pykv.client.connect(cluster.addresses)
    try:
        with db.transaction() as tx:
            for key in accounts:
                tx.put(key, 10)
        rounds = db.backend.core.rounds
        locked_before, totals = rounds[lock_round], []
        with Transfers(db, accounts) as moving:
            deadline = time.monotonic() + 4.0
            while time.monotonic() < deadline or rounds[lock_round] == locked_before:
                if reader == "scan":
                    balances = dict(db.scan(f"lockbank-{reader}/"))
                else:
                    balances = db.get_many(reversed(accounts))
                    assert list(balances) == accounts[::-1]
                assert sorted(balances) == accounts
                totals.append(sum(balances.values()))
                assert time.monotonic() < deadline + 30, "no reader had to lock"
        assert moving.errors == [] and moving.moved > 0
        assert set(totals) == {160}, totals
        print(f"\n{len(totals)} {reader}, {rounds[lock_round] - locked_before} of them locked; "
              f"{moving.moved} transfers meanwhile")
        db.put(accounts[0], 0)  # every lock was released
    finally:
        db.close()


def test_a_transaction_of_max_txn_bytes_in_one_shard_commits(cluster):
    """All of a transaction's bytes in one shard: one COMMIT request, one Raft entry, more
    than the 16 MiB frames clients used to be limited to (a ProtocolError then)."""
    db = pykv.client.connect(cluster.addresses)
    try:
        core = db.backend.core
        keys = [k for k in (f"bulk/{i}" for i in range(2000)) if core.shard_of(k) == core.shard_of("bulk/0")]
        values = [os.urandom(810_000) for _ in range(42)]
        with db.transaction() as tx:
            for key, value in zip(keys[:41], values, strict=False):
                tx.put(key, value)  # 33,210,000 bytes and keys: under max_txn_bytes (32 MiB)
            with pytest.raises(TransactionTooLarge):
                tx.put(keys[41], values[41])
        assert db.get_many(keys[:42]) == {**dict(zip(keys[:41], values, strict=False)), keys[41]: None}
        with db.transaction() as tx:
            for key in keys[:41]:
                tx.delete(key)
    finally:
        db.close()


def test_get_many_of_more_values_than_one_frame_holds(cluster):
    """17 values of almost 1 MiB on one shard: 17 MiB, more than a reply of 16 MiB (what
    commitflow.READ_BATCH_KEYS allows, so that a node given a max_frame that small answers),
    so the keys go in several READ requests (commitflow.read_batches) and all come back,
    as a snapshot and inside a transaction."""
    db = pykv.client.connect(cluster.addresses)
    try:
        core = db.backend.core
        same_shard = [k for k in (f"big/{i}" for i in range(400)) if core.shard_of(k) == core.shard_of("big/0")][:17]
        assert len(same_shard) == 17
        for i, key in enumerate(same_shard):
            db.put(key, bytes([i]) * ((1 << 20) - 64))
        expected = {key: bytes([i]) * ((1 << 20) - 64) for i, key in enumerate(same_shard)}
        assert db.get_many(same_shard) == expected
        with db.transaction() as tx:
            assert tx.get_many(same_shard) == expected
            tx.put("big/seen", len(same_shard))
        assert db.get("big/seen") == 17
        for key in same_shard:
            db.delete(key)
    finally:
        db.close()


def test_a_read_only_commit_confirms_versions_without_their_values(cluster):
    """A read-only transaction is confirmed by reading its keys' versions again: clocks and
    timestamps only (READ's clocks-only flag), not half a megabyte of value a second time."""
    db = pykv.client.connect(cluster.addresses)
    try:
        db.put("ro/big", b"x" * 500_000)
        core = db.backend.core
        full = db.backend._run(core.read_many(["ro/big", "ro/absent"]))
        bare = db.backend._run(core.read_many(["ro/big", "ro/absent"], clocks_only=True))
        assert full["ro/big"].value == b"x" * 500_000 and not bare["ro/big"].exists
        assert {k: (v.clock, v.timestamp) for k, v in bare.items()} == {
            k: (v.clock, v.timestamp) for k, v in full.items()
        }
        reader = db.transaction()
        assert len(reader.get("ro/big")) == 500_000 and reader.get("ro/absent") is None
        reader.commit()  # unchanged: confirmed by clocks
        reader = db.transaction()
        reader.get("ro/big")
        reader.get("ro/absent")
        db.put("ro/big", b"y")
        with pytest.raises(TransactionConflict):
            reader.commit()
    finally:
        db.close()


def test_a_range_lock_left_by_a_vanished_scanner_is_released_by_recovery(cluster):
    """A scanner that dies holding its range lock keeps writers out only until the shards'
    recovery (recovery_after, 2 s) releases it, as it settles any prepared transaction."""
    db = pykv.client.connect(cluster.addresses)
    try:
        db.put("orphan/a", 1)
        core = db.backend.core
        lock = CommitRequest(
            TxnIdSource().next_id(), 0, {}, (), timestamp=HybridClock().now(),
            ranges=(KeyRange("orphan/"),),
        )
        shards = list(range(4))
        for shard in shards:  # the lock round of commitflow.scan_rounds, and then nothing
            assert db.backend._run(core.router.call(shard, PREPARE, [shard, lock.to_wire(), shard, shards])) is None
        started = time.monotonic()
        with pytest.raises(KeyLocked, match="consistent scan"):
            db.put("orphan/a", 2)
        db.put("elsewhere", 1)  # outside the range
        while True:
            try:
                db.put("orphan/a", 2)
                break
            except KeyLocked:
                assert time.monotonic() - started < 20, "the lock was never released"
                time.sleep(0.1)
        print(f"\nreleased by recovery after {time.monotonic() - started:.1f}s")
        assert db.get("orphan/a") == 2
    finally:
        db.close()


def _hold_with_an_orphan_prepare(db: pykv.KeyValueStore, key: str) -> None:
    """Lock ``key`` with the prepare of a 2PC whose client then vanished: no decision ever
    comes from it, so the shard's recovery aborts it after recovery_after (2 s)."""
    router = db.backend.core.router
    shard = router.shard_of(key)
    holder = CommitRequest(
        TxnIdSource().next_id(), 0, {}, (WriteOp(key, OpKind.PUT, "never"),), timestamp=HybridClock().now(),
    )
    assert db.backend._run(router.call(shard, PREPARE, [shard, holder.to_wire(), shard, [shard]])) is None


def test_a_read_that_waits_on_a_prepared_transaction_stays_with_its_live_leader(cluster):
    """A read of a key that a prepared transaction holds waits on the shard's leader until
    the transaction is settled (here recovery aborts it, after recovery_after, 2 s). The
    leader answers the client's PING meanwhile, so the client goes on waiting on it: before,
    it took the leader for a frozen node once the attempt timeout (0.75 s) passed, passed it
    over for as long again, and asked followers that could only send it back."""
    db = pykv.client.connect(cluster.addresses)
    try:
        db.put("held/a", "before")
        router = db.backend.core.router
        _hold_with_an_orphan_prepare(db, "held/a")
        started = time.monotonic()
        assert db.get("held/a") == "before"
        waited = time.monotonic() - started
        print(f"\nthe read waited {waited:.2f}s; attempts that timed out: {dict(router.timeouts)}")
        assert waited > router.attempt_timeout  # it did wait on the lock past an attempt's time
        assert not router.timeouts  # and no node was taken for a silent one
    finally:
        db.close()


def test_closing_a_client_fails_the_calls_other_threads_have_under_way_at_once(cluster):
    """A thread in the middle of a call when another closes the client gets StoreClosed at
    once (before: it waited the client's last-resort deadline, timeout * 3 + 5 s, 35 s)."""
    db = pykv.client.connect(cluster.addresses)
    db.put("held/b", "before")
    _hold_with_an_orphan_prepare(db, "held/b")  # a read of it waits 2 s, until recovery
    outcome: list[BaseException | str] = []

    def read() -> None:
        try:
            outcome.append(db.get("held/b"))
        except BaseException as exc:  # noqa: BLE001 - what the caller got
            outcome.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.5)  # the read waits on the lock
    started = time.monotonic()
    db.close()
    reader.join(10)
    assert not reader.is_alive() and time.monotonic() - started < 1.5
    assert len(outcome) == 1 and isinstance(outcome[0], pykv.StoreClosed), outcome
    with pytest.raises(pykv.StoreClosed):
        db.get("held/b")


def test_closing_an_asyncio_client_ends_its_calls_under_way_without_connecting_again(cluster):
    """A call under way when its asyncio client closes ends with StoreClosed, rather than
    connecting again (a connection nothing would close) and waiting on: before, a read
    waiting on a held key went on over a new connection and returned 2 s after close."""
    holder = pykv.client.connect(cluster.addresses)  # holds the lock: its connections stay
    try:
        holder.put("held/c", "before")
        _hold_with_an_orphan_prepare(holder, "held/c")

        async def main() -> tuple[object, float, int]:
            db = await pykv.aio.connect(cluster.addresses)
            read = asyncio.ensure_future(db.get("held/c"))
            await asyncio.sleep(0.3)  # the read waits on the lock
            started = asyncio.get_running_loop().time()
            await db.close()
            try:
                outcome: object = await read
            except pykv.StoreClosed as exc:
                outcome = exc
            return outcome, asyncio.get_running_loop().time() - started, len(db._core.router._conns)

        outcome, waited, connections = asyncio.run(main())
        assert isinstance(outcome, pykv.StoreClosed) and waited < 1.0, (outcome, waited)
        assert connections == 0
    finally:
        holder.close()


def test_sync_client_serves_many_threads(cluster):
    import threading

    db = pykv.client.connect(cluster.addresses[:1])
    try:
        errors = []

        def work(i: int) -> None:
            try:
                for j in range(5):
                    db.put(f"thr:{i}:{j}", j)
                    assert db.get(f"thr:{i}:{j}") == j
            except Exception as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert len(list(db.scan("thr:"))) == 80
    finally:
        db.close()


def test_no_reachable_node_raises_unavailable():
    base = free_port_range(2)
    start = time.monotonic()
    with pytest.raises(Unavailable):
        pykv.client.connect([f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"], timeout=2)
    assert time.monotonic() - start < 30


def test_addresses_may_be_given_as_one_comma_separated_string(cluster):
    """As etcd's --endpoints takes them: pykv.connect, pykv.aio.connect and every command's
    --addresses (here `pykv status`, whose JSON names each node it reached)."""
    joined = ",".join(cluster.addresses)
    with pykv.client.connect(joined) as db:
        db.put("comma", "separated")
    assert asyncio.run(_aio_get(joined, "comma")) == "separated"
    status = subprocess.run(
        [sys.executable, "-m", "pykv.server.cli", "status", "--json", "--addresses", joined],
        capture_output=True, text=True, timeout=60, check=True,
    )
    nodes = json.loads(status.stdout)  # address -> its status, or why it could not be had
    assert sorted(nodes) == sorted(cluster.addresses)
    assert all(isinstance(node, dict) for node in nodes.values())


async def _aio_get(addresses: str, key: str):
    db = await pykv.aio.connect(addresses)
    try:
        return await db.get(key)
    finally:
        await db.close()


@pytest.mark.parametrize("addresses", ["localhost", "127.0.0.1:99999", " , ", ["127.0.0.1:1", 5]])
def test_an_address_that_is_not_host_port_is_refused_before_connecting(addresses):
    with pytest.raises(pykv.InvalidArgument, match="HOST:PORT|host:port|at least one address"):
        pykv.client.connect(addresses)
    got = subprocess.run(
        [sys.executable, "-m", "pykv.server.cli", "get", "k", "--addresses", "127.0.0.1:1,localhost"],
        capture_output=True, text=True, timeout=60,
    )
    assert got.returncode == 2 and "address 'localhost' is not 'host:port'" in got.stderr


@pytest.mark.parametrize("timeout", [0, -1, float("nan")])
def test_a_timeout_that_is_not_positive_is_refused(timeout):
    with pytest.raises(pykv.InvalidArgument, match="timeout must be"):
        pykv.client.connect(["127.0.0.1:1"], timeout=timeout)


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_without_a_quorum_operations_time_out_clearly(tmp_path, fault):
    with local_cluster(tmp_path, nodes=3, partitions=2) as cluster:
        db = pykv.client.connect(cluster.addresses, timeout=2)
        try:
            db.put("q", 1)
            for address in cluster.addresses:  # so that a stopped node leaves requests unanswered
                db.backend._run(db.backend.core.router.connection(address))
            for node in (2, 3):
                cluster.kill(node) if fault == "kill" else cluster.signal(node, signal.SIGSTOP)
            with pytest.raises((Timeout, Unavailable)) as info:
                db.put("q", 2)
            assert "shard" in str(info.value)
            if isinstance(info.value, Timeout):  # sent, unanswered: it may have been applied
                assert "the outcome is unknown" in str(info.value)
            with pytest.raises((Timeout, Unavailable)) as info:
                db.get("q")
            assert "shard" in str(info.value) and "outcome" not in str(info.value)  # a read changes nothing
            assert fault == "kill" or isinstance(info.value, Timeout)
        finally:
            db.close()


def test_a_frozen_cluster_answers_within_the_clients_timeout(tmp_path):
    # Every node paused by SIGSTOP: connections that never say HELLO waited their own 2 s
    # each, and a shard map refresh asked every node in turn, so a put with timeout=1 took
    # 7 s and a new client 6 s. The call's deadline bounds them now (slack for a slow host).
    with local_cluster(tmp_path, nodes=3, partitions=2) as cluster:
        db = pykv.client.connect(cluster.addresses[:1], timeout=1)
        try:
            db.put("frozen", 1)
            for node in (1, 2, 3):
                cluster.signal(node, signal.SIGSTOP)
            for call in (lambda: db.put("frozen", 2), lambda: db.get("frozen"),
                         lambda: pykv.client.connect(cluster.addresses, timeout=1)):
                started = time.monotonic()
                with pytest.raises((Timeout, Unavailable)):
                    call()
                assert time.monotonic() - started < 2.5
            for node in (1, 2, 3):
                cluster.signal(node, signal.SIGCONT)
            db.put("frozen", 3)
            assert db.get("frozen") == 3
        finally:
            db.close()


def test_prepare_votes_settle_like_gather_with_exceptions():
    # AsyncCluster._two_phase collects PREPARE votes with settled: every call runs to its
    # end, concurrently, and a failed one is its exception, in the order of the calls.
    from pykv.client.cluster import settled

    async def vote(delay: float, error: Exception | None = None) -> float:
        await asyncio.sleep(delay)
        if error is not None:
            raise error
        return delay

    async def main() -> None:
        refused = Unavailable("no leader")
        votes = await settled([vote(0.02), vote(0.0, refused), vote(0.01)])
        assert votes == [0.02, refused, 0.01]
        assert await settled([vote(0.0)]) == [0.0]
        assert await settled([]) == []

        # Cancelling the caller cancels the calls still running, as gather would.
        started = asyncio.get_running_loop().create_task(settled([vote(0.0), vote(10.0)]))
        await asyncio.sleep(0.01)
        before = len(asyncio.all_tasks())
        started.cancel()
        with pytest.raises(asyncio.CancelledError):
            await started
        await asyncio.sleep(0)
        assert len(asyncio.all_tasks()) == before - 2  # the caller and its remaining call

    asyncio.run(main())


def test_get_many_of_a_transaction_leaves_no_read_behind(cluster):
    # The bench driver reads a transaction's keys with one get_many (every read in flight at
    # once): the values in key order, and an error raised with no read left running.
    async def main() -> None:
        db = await pykv.aio.connect(cluster.addresses)
        try:
            await db.put("getall:a", "A")
            tx = db.transaction()
            tx["getall:c"] = "mine"
            assert list((await tx.get_many(["getall:a", "getall:b", "getall:c"])).values()) == ["A", None, "mine"]
            await tx.abort()
            tx = db.transaction()
            with pytest.raises(KeyTooLarge):
                await tx.get_many(["getall:a", "getall:b", ""])
            await asyncio.sleep(0.05)
            assert asyncio.all_tasks() == {asyncio.current_task()}
            await tx.abort()
        finally:
            await db.close()

    asyncio.run(main())


def test_a_scanner_that_holds_its_range_lock_longer_than_recovery_keeps_it(cluster):
    """A locked pass may outlast the shards' recovery time (recovery_after, 2 s): a big
    range, or a page that waits for a writer. While each round waits, the client PREPAREs
    the lock again (Round.keep), so recovery leaves it alone and the release, 3 s later,
    finds it held. The same wait without renewals loses the lock to recovery."""
    db = pykv.client.connect(cluster.addresses)
    core = db.backend.core
    shards = list(range(4))

    async def hold(seconds: float, renew: bool) -> list:
        lock = CommitRequest(
            TxnIdSource().next_id(), 0, {}, (), timestamp=HybridClock().now(),
            ranges=(KeyRange("renewed/"),),
        )
        prepares = [Send(s, cmd.PREPARE, [lock.to_wire(), s, shards]) for s in shards]
        assert await settled(core._calls(prepares)) == [None] * 4
        waiting = Round("scan", [], keep=prepares if renew else [], keep_every=LOCK_RENEW_EVERY)
        await core._keeping(waiting, asyncio.sleep(seconds, result=[]))
        return await settled(core._calls([Send(s, cmd.FINISH, [lock.txid, False]) for s in shards]))

    try:
        assert db.backend._run(hold(3.0, renew=True)) == [None] * 4
        released = db.backend._run(hold(3.0, renew=False))
        assert any(r is not None for r in released), released  # recovery took it first
    finally:
        db.close()


def test_a_scan_of_a_range_larger_than_a_frame_comes_in_pages(tmp_path):
    """19 values of 950 KB on one shard: 18 MB, more than the biggest frame (16 MiB). A
    shard answers a scan about 1 MiB at a time, so the range comes whole, consistent or
    not, sync or asyncio."""
    values = {f"big/{i:02d}": random.Random(i).randbytes(950_000) for i in range(19)}
    with local_cluster(tmp_path, nodes=3, partitions=1) as big:
        db = pykv.client.connect(big.addresses, timeout=30)
        try:
            for key, value in values.items():
                db.put(key, value)
            db.put("big/zz", 1)
            db.delete("big/zz")
            assert dict(db.scan("big/", consistent=False)) == values
            assert dict(db.scan("big/")) == values
            assert [k for k, _ in db.scan("big/", start="big/17")] == ["big/17", "big/18"]
            assert [k for k, _ in db.scan("big/", consistent=False, limit=2)] == ["big/00", "big/01"]
            lazily = db.scan("big/", consistent=False)  # fetches pages as it is iterated
            assert next(lazily)[0] == "big/00"
        finally:
            db.close()

        async def scan_iter() -> dict:
            adb = await pykv.aio.connect(big.addresses, timeout=30)
            try:
                return {k: v async for k, v in adb.scan_iter("big/")}
            finally:
                await adb.close()

        assert asyncio.run(scan_iter()) == values
