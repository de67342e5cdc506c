"""pykv.open specifics: reopening, the directory lock, options, the read cache, compaction."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from forking import in_forked_child
from transfers import Transfers, backups_while_moving

import pykv
from pykv._engine.vclock import AFTER
from pykv.embedded import _ScanGate
from pykv.txn.model import KeyRange


def run_python(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python argv...`` in a child process that imports this pykv (``-c SCRIPT ARG`` or
    ``-m MODULE ARG``), with its output as text."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=timeout)


def test_everything_committed_survives_a_reopen(tmp_path):
    path = tmp_path / "db"
    with pykv.open(path) as db:
        db.put("s", "text")
        db.put("i", -42)
        db.put("b", b"\x00\x01")
        db.put("l", ["x", 1, b"y"])
        db.put("big", "z" * 50_000)
        db.put("gone", 1)
        db.delete("gone")
        db.incr("n", 7)
        db.append("log", "first")
    with pykv.open(path) as db:
        assert db.get("s") == "text"
        assert db.get("i") == -42
        assert db.get("b") == b"\x00\x01"
        assert db.get("l") == ["x", 1, b"y"]
        assert db.get("big") == "z" * 50_000
        assert db.get("gone") is None
        assert db.get("n") == 7
        assert db.get("log") == ["first"]
        assert [k for k, _ in db.scan()] == ["b", "big", "i", "l", "log", "n", "s"]


def test_opening_a_file_as_a_store_says_so_and_leaves_the_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    with pytest.raises(pykv.InvalidArgument, match="is a file, not a store's directory"):
        pykv.open(path)
    with pytest.raises(pykv.InvalidArgument, match="notes.txt is a file"):
        pykv.open(path / "db")  # a file among its parents
    assert path.read_text() == "mine"


def test_a_second_process_gets_store_locked(tmp_path):
    path = tmp_path / "db"
    probe = textwrap.dedent(
        """
        import sys, pykv
        try:
            pykv.open(sys.argv[1])
        except pykv.StoreLocked as exc:
            print("StoreLocked:", exc)
            sys.exit(3)
        print("opened")
        """
    )
    with pykv.open(path) as db:
        db.put("k", "mine")
        child = run_python("-c", probe, str(path), timeout=60)
        assert child.returncode == 3, child.stdout + child.stderr
        assert "StoreLocked" in child.stdout
        assert db.get("k") == "mine"  # the holder is unaffected
    child = run_python("-c", probe, str(path), timeout=60)
    assert child.stdout.strip() == "opened", child.stderr


def test_forked_children_exit_at_once_while_the_parent_writes(tmp_path):
    """Children made by fork() under four writing threads, exiting normally (atexit runs):
    their copies of the WAL writer must neither wait on a lock copied mid-write (6 of 100
    children hung before) nor write to the parent's log."""
    script = textwrap.dedent(
        """
        import os, sys, threading, time, pykv
        db = pykv.open(sys.argv[1], fsync="interval")
        stop, written = threading.Event(), []
        def write(n):
            i = 0
            while not stop.is_set():
                db.put(f"w{n}/{i}", "x" * 100)
                i += 1
            written.append(i)
        threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        hung = 0
        for _ in range(60):
            pid = os.fork()
            if pid == 0:
                sys.exit(0)
            deadline = time.monotonic() + 3
            while not os.waitpid(pid, os.WNOHANG)[0]:
                if time.monotonic() > deadline:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    hung += 1
                    break
                time.sleep(0.002)
        stop.set()
        for t in threads:
            t.join()
        db.close()
        with pykv.open(sys.argv[1]) as db:
            print(hung, sum(written), sum(1 for _ in db.scan("w")))
        """
    )
    run = run_python("-c", script, str(tmp_path / "db"), timeout=300)
    assert run.returncode == 0, run.stderr
    hung, written, read_back = map(int, run.stdout.split())
    assert hung == 0 and written > 0 and read_back == written


def test_a_forked_child_opens_the_store_once_the_parent_closed_it(tmp_path):
    """The child's copy of the directory lock is let go at the fork: otherwise the lock
    would outlive the parent's close for as long as the child runs."""
    db = pykv.open(tmp_path / "db")
    db.put("k", "parent's")

    def child() -> object:
        deadline = time.monotonic() + 5
        while True:
            try:
                mine = pykv.open(tmp_path / "db")
                break
            except pykv.StoreLocked:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        with mine:
            mine.put("child", 1)
            return mine.get("k")

    closer = threading.Timer(0.3, db.close)  # the parent closes its store after the fork
    closer.start()
    assert in_forked_child(child) == "returned \"parent's\""
    closer.join()
    with pykv.open(tmp_path / "db") as db:
        assert db.get("child") == 1


def test_a_failed_write_keeps_what_was_acknowledged_and_lets_the_process_reopen(tmp_path):
    """The files stop growing (RLIMIT_FSIZE here, as a full disk would): the write fails with
    the cause, later writes say the same (not "closed"), reads still work, close() reports
    the failure but lets go of the directory, and the same process opens the store again
    once the cause is gone, with every acknowledged write (before, the lock stayed held)."""
    script = textwrap.dedent(
        """
        import resource, signal, sys, pykv
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write(), not a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 20, resource.RLIM_INFINITY))
        db = pykv.open(sys.argv[1])
        acked = 0
        try:
            while True:
                db.put(f"k{acked:06d}", "x" * 2000)
                acked += 1
        except OSError as exc:
            print("failed:", exc)
        try:
            db.put("later", 1)
        except OSError as exc:
            print("later:", exc)
        print("read:", db.get("k000000") == "x" * 2000)
        try:
            db.close()
        except OSError as exc:
            print("close:", exc)
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        with pykv.open(sys.argv[1]) as db:
            print("acked and kept:", acked, sum(1 for _ in db.scan("k")))
            db.put("later", 1)
            print("writes again:", db.get("later") == 1)
        """
    )
    run = run_python("-c", script, str(tmp_path / "db"), timeout=120)
    assert run.returncode == 0, run.stderr
    lines = dict(line.split(": ", 1) for line in run.stdout.splitlines())
    failure = "failed: File too large; it takes no more records (those acknowledged before are kept)"
    assert failure in lines["failed"] and failure in lines["later"] and failure in lines["close"]
    assert lines["read"] == "True" and lines["writes again"] == "True"
    acked, kept = map(int, lines["acked and kept"].split())
    assert acked > 1000 and kept == acked


def test_threads_writing_and_reading_compressed_values_at_once(tmp_path):
    """Values of 4 KiB and more are zstd-compressed on the committing thread and
    decompressed on the reading one. One zstd context shared by every thread made wrong
    output, CorruptData and segfaults (so this runs in a child process)."""
    script = textwrap.dedent(
        """
        import random, sys, threading, pykv
        db = pykv.open(sys.argv[1], fsync="off")
        failures = []
        def work(n):
            rng = random.Random(n)
            last = {}
            try:
                for i in range(400):
                    key = f"t{n}/{i % 20}"
                    last[key] = f"v{rng.randrange(1000)}-" * rng.randrange(800, 12000)
                    db.put(key, last[key])
                    probe = f"t{n}/{rng.randrange(20)}"
                    if db.get(probe) != last.get(probe):
                        failures.append(f"{probe} read back wrong")
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print(failures[:3] or "ok")
        """
    )
    run = run_python("-c", script, str(tmp_path / "db"), timeout=300)
    assert (run.returncode, run.stdout.strip()) == (0, "ok"), run.stderr[-2000:]


def test_pykv_check_lists_a_damaged_value_and_the_key_can_be_written_again(tmp_path):
    """A byte flipped in a value the WAL's open did not re-read (an older segment): reads of
    that key raise CorruptData, `pykv check` names it and exits 1; deleting the key (no
    read of the old value) repairs the store, and check exits 0."""
    path = tmp_path / "db"
    with pykv.open(path, segment_bytes=1 << 18) as db:
        for i in range(3000):
            db.put(f"k{i:05d}", f"value-{i}-" + "x" * 200)
    segment = next(s for s in sorted((path / "wal").iterdir()) if b"value-1234-" in s.read_bytes())
    data = bytearray(segment.read_bytes())
    data[data.find(b"value-1234-") + 3] ^= 0x01
    segment.write_bytes(data)

    def check() -> tuple[int, dict]:
        run = run_python("-m", "pykv.server.cli", "check", str(path), "--json")
        return run.returncode, json.loads(run.stdout)

    code, report = check()
    assert code == 1 and report["keys"] == 3000
    assert [d["key"] for d in report["damaged"]] == ["k01234"]
    assert "checksum mismatch" in report["damaged"][0]["error"]
    with pykv.open(path) as db:
        with pytest.raises(pykv.CorruptData):
            db.get("k01234")
        db.delete("k01234")
        assert db.get("k01235") == "value-1235-" + "x" * 200
    assert check() == (0, {"keys": 2999, "damaged": []})


def test_pykv_salvage_copies_a_store_that_refuses_to_open_without_its_damaged_record(tmp_path):
    """A flipped bit in a record the open replays, with records after it: the store refuses to
    open and says to salvage it; `pykv salvage` makes a copy with every other commit."""
    path = tmp_path / "db"
    write = "import os, sys, pykv\n" \
            "db = pykv.open(sys.argv[1], segment_bytes=1 << 16)\n" \
            "for i in range(600): db.put(f'k{i:04d}', f'value-{i}-' + 'x' * 200)\n" \
            "os._exit(0)  # no close: no checkpoint, so the open replays every record\n"
    assert run_python("-c", write, str(path)).returncode == 0
    segment = next(s for s in sorted((path / "wal").iterdir()) if b"value-300-" in s.read_bytes())
    data = bytearray(segment.read_bytes())
    data[data.find(b"value-300-") + 3] ^= 0x01
    segment.write_bytes(data)
    with pytest.raises(pykv.CorruptData, match=f"pykv salvage {path} NEW_DIR"):
        pykv.open(path)

    run = run_python("-m", "pykv.server.cli", "salvage", str(path), str(tmp_path / "copy"), "--json")
    assert run.returncode == 1, run.stderr
    report = json.loads(run.stdout)
    assert (report["lost_records"], report["keys"], report["damaged_values"]) == (1, 599, [])
    with pykv.open(tmp_path / "copy") as db:
        assert db.get("k0300") is None  # its commit is the one lost
        assert all(db.get(f"k{i:04d}") == f"value-{i}-" + "x" * 200 for i in range(600) if i != 300)
        db.put("k0300", "again")
    run = run_python("-m", "pykv.server.cli", "salvage", str(path), str(tmp_path / "table"))
    assert run.returncode == 1 and "1 damaged records replaced" in " ".join(run.stderr.split())
    run = run_python("-m", "pykv.server.cli", "salvage", str(tmp_path / "copy"), str(tmp_path / "again"))
    assert run.returncode == 0 and "no damaged record" in run.stderr  # nothing to salvage


def test_backup_while_writers_and_compaction_run_is_one_consistent_state(tmp_path):
    """db.backup() under 4 threads moving money and a thread compacting without pause: the
    copy opens, its accounts add up, it holds every commit acknowledged before the call."""
    accounts = [f"acct{i:02d}" for i in range(20)]
    copies = [tmp_path / "copy1", tmp_path / "copy2"]
    with pykv.open(tmp_path / "db", segment_bytes=1 << 15) as db:
        with db.transaction() as tx:
            for account in accounts:
                tx.put(account, 100)
        storage = db.backend.storage
        stop = threading.Event()

        def compact() -> None:
            while not stop.is_set():
                storage.compact()

        compactor = threading.Thread(target=compact)
        compactor.start()
        try:
            for progress in backups_while_moving(db, accounts, copies, "acknowledged-before-backup-"):
                assert progress and progress[-1][0] == progress[-1][1] > 0
        finally:
            stop.set()
            compactor.join()
        assert storage.stats()["compactions"] > 0
    for n, copy in enumerate(copies):
        with pykv.open(copy) as backup:
            assert sum(backup.get(account) for account in accounts) == 100 * len(accounts)
            assert backup.get(f"acknowledged-before-backup-{n}") is not None
            backup.put("the copy", "takes commits")
    with pytest.raises(pykv.InvalidArgument, match="is not empty: backup writes a new store"):
        with pykv.open(tmp_path / "db") as db:
            db.backup(copies[0])


def test_pykv_backup_copies_a_closed_store_and_points_a_live_one_to_db_backup(tmp_path):
    with pykv.open(tmp_path / "db") as db:
        for i in range(100):
            db.put(f"k{i}", i)

    def backup(target: str) -> tuple[int, str]:
        run = run_python("-m", "pykv.server.cli", "backup", str(tmp_path / "db"), str(tmp_path / target))
        return run.returncode, " ".join(run.stderr.split())  # rich wraps long lines

    code, said = backup("copy")
    assert code == 0 and "holding 100 keys; it opens" in said
    with pykv.open(tmp_path / "copy") as copy:
        assert [copy.get(f"k{i}") for i in range(100)] == list(range(100))
    code, said = backup("copy")
    assert code == 2 and "is not empty: backup writes a new store" in said
    run = run_python("-m", "pykv.server.cli", "backup", str(tmp_path / "db"), "/proc/pykv-no-copy-here")
    said = " ".join(run.stderr.split())
    assert run.returncode == 2 and "cannot back up" in said and "Traceback" not in said
    with pykv.open(tmp_path / "db"):
        code, said = backup("other")
    assert code == 2 and "backs it up itself, while it serves: db.backup(path)" in said


def test_a_second_open_in_the_same_process_is_refused_too(tmp_path):
    with pykv.open(tmp_path / "db"), pytest.raises(pykv.StoreLocked):
        pykv.open(tmp_path / "db")


def test_unknown_options_and_bad_policies_are_rejected(tmp_path):
    with pytest.raises(pykv.InvalidArgument, match="unknown option"):
        pykv.open(tmp_path / "db", cache_size=10)
    with pytest.raises(pykv.InvalidArgument, match="fsync"):
        pykv.open(tmp_path / "db", fsync="sometimes")
    with pykv.open(tmp_path / "db") as db:  # nothing was left locked by the failures
        db.put("k", 1)


def test_a_larger_max_txn_ops_is_honoured_end_to_end(tmp_path):
    with pykv.open(tmp_path / "db", max_txn_ops=12_000) as db:
        with db.transaction() as tx:
            for i in range(12_000):
                tx.put(f"k{i}", i)
        assert db.get("k11999") == 11_999


def test_a_small_read_cache_still_serves_every_value(tmp_path):
    with pykv.open(tmp_path / "db", cache_bytes=4096) as db:
        for batch in range(5):
            with db.transaction() as tx:
                for i in range(100):
                    tx.put(f"k{batch * 100 + i:04d}", os.urandom(8) + bytes([i]) * 1000)
        for i in range(500):
            assert db.get(f"k{i:04d}")[8:] == bytes([i % 100]) * 1000
        stats = db.backend.stats()
        assert stats["cache_bytes"] <= 4096
        assert stats["cache_misses"] > 0  # values came from disk, not from memory


def test_background_compaction_keeps_the_latest_values(tmp_path):
    path = tmp_path / "db"
    options = dict(segment_bytes=64 << 10, compaction_interval=0.05)
    with pykv.open(path, **options) as db:
        for rnd in range(40):
            with db.transaction() as tx:
                for i in range(20):
                    tx.put(f"k{i}", [rnd, os.urandom(500)])
        deadline = time.monotonic() + 30
        while db.backend.stats()["compactions"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert db.backend.stats()["compactions"] >= 1
        assert [db.get(f"k{i}")[0] for i in range(20)] == [39] * 20
    with pykv.open(path, **options) as db:
        assert [db.get(f"k{i}")[0] for i in range(20)] == [39] * 20


def test_recovery_reports_progress(tmp_path):
    path = tmp_path / "db"
    with pykv.open(path) as db:
        db.put("k", 1)
    phases = []
    with pykv.open(path, progress=lambda phase, done, total: phases.append(phase)) as db:
        assert db.get("k") == 1
    assert phases  # a caller can show a bar while a large store starts


def test_a_context_from_before_a_delete_and_reopen_stays_stale(tmp_path):
    path = tmp_path / "db"
    with pykv.open(path) as db:
        db.put("doc", "v1")
        _, clock = db.get_versioned("doc")
        db.delete("doc")
    with pykv.open(path) as db:
        db.put("doc", "recreated")  # blind: starts from the tombstone's clock, not from zero
        with pytest.raises(pykv.TransactionConflict):
            db.put("doc", "edit of v1", context=clock)
        assert db.get("doc") == "recreated"


def test_a_deleted_key_keeps_its_clock_through_compaction_and_reopen(tmp_path):
    """The delete's record is compacted away; its tombstone (in the hint) keeps the clock."""
    path = tmp_path / "db"
    with pykv.open(path, segment_bytes=4096, compaction=False) as db:
        db.put("doc", "v1")
        _, before = db.get_versioned("doc")
        db.delete("doc")
        _, deleted = db.get_versioned("doc")
        assert deleted.compare(before) == AFTER  # the delete is a newer version, not nothing
        for _ in range(100):
            db.put("filler", "x" * 100)
        db.backend.storage.compact()
        assert db.backend.stats()["tombstones"] == 1
    with pykv.open(path, compaction=False) as db:
        assert db.get_versioned("doc") == (None, deleted)
        assert list(db.scan()) == [("filler", "x" * 100)]
        db.put("doc", "recreated")
        with pytest.raises(pykv.TransactionConflict):
            db.put("doc", "edit of v1", context=before)
        assert db.get("doc") == "recreated"


def test_group_commit_many_threads_all_durable(tmp_path, run_threads):
    path = tmp_path / "db"
    with pykv.open(path) as db:
        def worker(index: int) -> None:
            for n in range(40):
                db.put(f"t{index}/{n}", n)

        run_threads(8, worker)
        stats = db.backend.stats()
        assert stats["durable_lsn"] == stats["last_lsn"]
    with pykv.open(path) as db:
        assert len(list(db.scan())) == 8 * 40


def test_a_consistent_scan_keeps_writers_out_for_its_last_pass(tmp_path):
    """Four threads move money between 400 accounts without pause: passes over the range
    seldom agree, so after three the scan stops every writing commit for one last pass
    (EmbeddedBackend._ScanGate). Every scan returns, with the full total."""
    accounts = [f"acct/{i:03d}" for i in range(400)]
    with pykv.open(tmp_path / "db") as db:
        with db.transaction() as tx:
            for key in accounts:
                tx.put(key, 10)
        with Transfers(db, accounts) as moving:
            totals = [sum(v for _, v in db.scan("acct/")) for _ in range(20)]
        assert moving.errors == [] and moving.moved > 0
        assert totals == [4000] * 20


def test_a_scan_gate_keeps_out_only_the_commits_that_write_into_its_range():
    """The last pass of a consistent scan waits for the commits already writing into its
    range, and keeps new ones out until it ends; commits writing elsewhere never wait."""
    gate = _ScanGate()
    inside = gate.enter(["a/1"])  # a commit writing into the range, under way
    closed, scanned = threading.Event(), threading.Event()

    def scan() -> None:
        with gate.closed(KeyRange("a/")):
            closed.set()
            scanned.wait(10)

    def commit(written: list[str]) -> threading.Event:
        done = threading.Event()
        threading.Thread(target=lambda: (gate.leave(gate.enter(written)), done.set()), daemon=True).start()
        return done

    scanner = threading.Thread(target=scan, daemon=True)
    scanner.start()
    assert not closed.wait(0.3)  # waits for the commit under way in its range
    assert commit(["b/1"]).wait(5)  # elsewhere: in and out while the scan waits
    gate.leave(inside)
    assert closed.wait(10)
    assert commit(["b/1", "c/1"]).wait(5)  # and while it holds the range
    into_range = commit(["b/2", "a/2"])
    assert not into_range.wait(0.3)  # kept out while the pass runs
    scanned.set()
    assert into_range.wait(10)
    scanner.join()


def test_no_commit_is_inside_a_scan_gate_range_while_the_scan_holds_it():
    """Commits enter the gate without its lock (a scan adds its range, then looks for
    commits inside; a commit counts itself in, then looks for scans): with thread switches
    as frequent as the interpreter allows, no commit writing into the range is ever inside
    while a scan holds it."""
    gate = _ScanGate()
    inside, seen, stop = [0], [], threading.Event()

    def commit(key: str) -> None:
        while not stop.is_set():
            ticket = gate.enter([key])
            inside[0] += 1
            time.sleep(0)  # as a commit does work in between
            inside[0] -= 1
            gate.leave(ticket)

    def scan() -> None:
        for _ in range(500):
            with gate.closed(KeyRange("a/")):
                for _ in range(5):
                    seen.append(inside[0])
                    time.sleep(0)  # the writers run meanwhile
            time.sleep(0)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    writers = [threading.Thread(target=commit, args=(f"a/{i}",), daemon=True) for i in range(3)]
    scanner = threading.Thread(target=scan, daemon=True)
    try:
        for thread in [*writers, scanner]:
            thread.start()
        scanner.join(30)  # a scan waiting keeps new commits out: it cannot starve
        assert not scanner.is_alive()
    finally:
        stop.set()
        sys.setswitchinterval(interval)
    for thread in writers:
        thread.join()
    assert len(seen) == 500 * 5 and set(seen) == {0}


def test_the_shell_commands_work_on_an_embedded_store_and_reads_change_nothing(tmp_path):
    path = str(tmp_path / "db")

    def cli(*argv: str) -> subprocess.CompletedProcess:
        return run_python("-m", "pykv.server.cli", *argv, "--data-dir", path)

    assert cli("put", "user:1", "alice").returncode == 0  # creates the store
    assert cli("put", "n", "5", "--type", "int").returncode == 0
    txn = cli("txn", "get:user:1", "incr:n=2", "append:log=x")
    assert (txn.returncode, json.loads(txn.stdout)) == (0, {"0:user:1": "alice"}), txn.stderr
    before = {name: os.stat(os.path.join(root, name)).st_mtime_ns
              for root, _, names in os.walk(path) for name in names}
    assert json.loads(cli("get", "n").stdout) == 7
    assert cli("get", "absent").returncode == 1
    scanned = [json.loads(line) for line in cli("scan").stdout.splitlines()]
    assert scanned == [{"key": "log", "value": ["x"]}, {"key": "n", "value": 7},
                       {"key": "user:1", "value": "alice"}]
    assert json.loads(cli("txn", "get:n", "get:log").stdout) == {"0:n": 7, "1:log": ["x"]}
    assert json.loads(cli("resolvers").stdout) == {}
    after = {name: os.stat(os.path.join(root, name)).st_mtime_ns
             for root, _, names in os.walk(path) for name in names}
    assert after == before  # reads open the store read-only
    assert json.loads(cli("resolvers", "--set", "n", "max").stdout) == {"n": "max"}
    assert json.loads(cli("resolvers", "--set", "log", "union").stdout) == {"log": "union", "n": "max"}
    assert json.loads(cli("resolvers", "--unset", "log").stdout) == {"n": "max"}
    unknown = cli("resolvers", "--set", "x", "no-such")
    assert unknown.returncode == 2 and "no built-in resolver 'no-such'" in unknown.stderr
    with pykv.open(path) as db:
        assert db.resolvers() == {"n": "max"}
    with pykv.open(path):  # while a process has it open, the shell is told who
        locked = cli("get", "n")
        assert locked.returncode == 2 and "StoreLocked" in locked.stderr
        assert str(os.getpid()) in locked.stderr
    missing = run_python("-m", "pykv.server.cli", "get", "k", "--data-dir", str(tmp_path / "none"))
    assert missing.returncode == 2 and "is not a pykv store" in missing.stderr
    assert not (tmp_path / "none").exists()


def test_a_store_keeps_built_in_resolvers_and_forgets_functions_when_reopened(tmp_path):
    """Built-in names are kept in the store's RESOLVERS file, so the store, its backups and
    read-only opens apply them; a function lasts as long as its handle, and replaces a kept
    name for its prefix (after a reopen: the default, abort). A read-only handle registers
    for itself only."""

    def conflict(db, key):  # a merge-isolation write-write conflict on key (ints)
        db.put(key, 10)
        t1 = db.transaction(isolation="merge")
        t1.put(key, t1.get(key) + 1)
        db.put(key, 15)
        t1.commit()
        return db.get(key)

    path = tmp_path / "db"
    with pykv.open(path) as db:
        db.register_resolver("ctr/", "counter")
        db.register_resolver("hi/", "max")
        db.register_resolver("fn/", "min")
        db.register_resolver("fn/", lambda base, current, mine: 99)
        assert conflict(db, "fn/x") == 99
        assert db.resolvers() == {"ctr/": "counter", "fn/": "test_a_store_keeps_built_in_resolvers_"
                                  "and_forgets_functions_when_reopened.<locals>.<lambda>", "hi/": "max"}
        db.backup(tmp_path / "copy")
    for reopened in (path, tmp_path / "copy"):
        with pykv.open(reopened) as db:
            assert conflict(db, "ctr/x") == 16 and conflict(db, "hi/x") == 15
            with pytest.raises(pykv.TransactionConflict):
                conflict(db, "fn/x")
    with pykv.open(path, read_only=True) as db:
        assert db.backend.resolvers.name_for("ctr/x") == "counter"
        db.register_resolver("ro/", "max")
        assert db.backend.resolvers.name_for("ro/x") == "max"
    with pykv.open(path) as db:
        assert db.backend.resolvers.name_for("ro/x") == "abort"
    for damaged in (b"{not json", b'{"ctr/": "no-such-resolver"}'):
        (path / "RESOLVERS").write_bytes(damaged)
        with pytest.raises(pykv.CorruptData, match="RESOLVERS.*without the file the store opens"):
            pykv.open(path)
