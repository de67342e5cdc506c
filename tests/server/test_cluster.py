"""A real 3-node cluster on 127.0.0.1: transactions over the network, routing, CLI, bad frames."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster_harness import local_cluster  # noqa: E402
from transfers import backups_while_moving  # noqa: E402

import pykv.client  # noqa: E402
from pykv.client.admin import fetch_shard_map, fetch_status  # noqa: E402
from pykv.errors import InvalidOperation, TransactionConflict  # noqa: E402
from pykv.replica.commitflow import ExportPass  # noqa: E402
from pykv.txn.model import KeyRange  # noqa: E402


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with local_cluster(tmp_path_factory.mktemp("c3"), nodes=3, partitions=8) as c:
        yield c


@pytest.fixture
def db(cluster):
    store = pykv.client.connect([cluster.addresses[1]], timeout=10)
    yield store
    store.close()


def _keys_over_every_shard(db, prefix: str) -> list[str]:
    """One key per shard of the cluster."""
    core = db.backend.core
    found: dict[int, str] = {}
    i = 0
    while len(found) < core.router.map.partitions:
        key = f"{prefix}{i}"
        found.setdefault(core.shard_of(key), key)
        i += 1
    return [found[s] for s in sorted(found)]


def test_one_address_is_enough_to_learn_every_node_and_shard(cluster, db):
    view = db.backend.core.router.map
    assert sorted(view.nodes.values()) == sorted(cluster.addresses)
    assert view.partitions == 8
    assert all(len(replicas) == 3 for replicas in view.shards)
    for key in _keys_over_every_shard(db, "any-"):
        db.put(key, key.upper())
    for key in _keys_over_every_shard(db, "any-"):
        assert db.get(key) == key.upper()


def test_every_node_serves_the_same_committed_data(cluster, db):
    db.put("shared", [1, "two", b"3"])
    for address in cluster.addresses:
        with pykv.client.connect([address]) as other:
            assert other.get("shared") == [1, "two", b"3"]


def test_multi_shard_transaction_commits_all_or_nothing(db):
    keys = _keys_over_every_shard(db, "atomic-")
    with db.transaction() as tx:
        for key in keys:
            tx.put(key, "v1")
    assert [db.get(k) for k in keys] == ["v1"] * len(keys)

    # A conflicting transaction over the same shards aborts entirely.
    tx = db.transaction()
    for key in keys:
        assert tx.get(key) == "v1"
    db.put(keys[-1], "changed")
    for key in keys:
        tx.put(key, "v2")
    with pytest.raises(TransactionConflict):
        tx.commit()
    assert [db.get(k) for k in keys[:-1]] == ["v1"] * (len(keys) - 1)
    assert db.get(keys[-1]) == "changed"


def test_single_shard_conflict_and_transact_retry(db):
    db.put("counter", 0)
    first, second = db.transaction(), db.transaction()
    first.put("counter", first.get("counter") + 1)
    second.put("counter", second.get("counter") + 1)
    first.commit()
    with pytest.raises(TransactionConflict):
        second.commit()
    db.transact(lambda tx: tx.put("counter", tx.get("counter") + 10))
    assert db.get("counter") == 11


def test_commutative_increments_from_many_threads_all_count(db):
    import threading

    keys = _keys_over_every_shard(db, "hits-")[:3]

    def bump() -> None:
        for _ in range(10):
            with db.transaction() as tx:
                for key in keys:
                    tx.incr(key, 1)

    threads = [threading.Thread(target=bump) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [db.get(k) for k in keys] == [60, 60, 60]


def test_scan_merges_every_shard_in_key_order(db):
    for i in range(30):
        db.put(f"scan/{i:02d}", i)
    db.delete("scan/05")
    items = list(db.scan("scan/"))
    assert [k for k, _ in items] == [f"scan/{i:02d}" for i in range(30) if i != 5]
    assert list(db.scan("scan/", start="scan/10", end="scan/13")) == [
        ("scan/10", 10), ("scan/11", 11), ("scan/12", 12)
    ]
    assert len(list(db.scan("scan/", limit=4))) == 4


def test_resolvers_registered_by_name_run_on_every_replica(db):
    db.register_resolver("max:", "max")
    db.put("max:score", 5)
    tx = db.transaction("merge")
    assert tx.get("max:score") == 5
    tx.put("max:score", 7)
    db.put("max:score", 9)  # a concurrent write: the resolver keeps the larger
    tx.commit()
    assert db.get("max:score") == 9
    with pytest.raises(InvalidOperation):
        db.register_resolver("fn:", lambda base, current, mine: mine.value)


def test_versioned_put_with_an_old_context_conflicts(db):
    db.put("etag", "a")
    _, clock = db.get_versioned("etag")
    db.put("etag", "b")
    with pytest.raises(TransactionConflict):
        db.put("etag", "c", context=clock)
    assert db.get("etag") == "b"


def test_status_and_shard_map_report_one_leader_per_shard(cluster):
    statuses = [fetch_status(a) for a in cluster.addresses]
    for shard in range(8):
        leaders = [s["node_id"] for s in statuses if s["groups"][str(shard)]["role"] == "leader"]
        assert len(leaders) == 1
    shard_map = fetch_shard_map(cluster.addresses[0])
    assert len(shard_map["shards"]) == 8
    # The metadata group shows too: on exactly its voters, with one leader among them.
    hosting = {s["node_id"]: s["meta"] for s in statuses if s["meta"] is not None}
    assert sorted(hosting) == sorted(shard_map["meta"])
    assert [n for n, meta in hosting.items() if meta["role"] == "leader"] == [
        next(iter(hosting.values()))["leader"]
    ]


def test_a_client_whose_clock_runs_an_hour_ahead_is_refused(db):
    """Admitted, its transactions would later poison the shards' watermark of forgotten txids
    (every honest client's commits refused as possible retries for that hour)."""
    import time

    honest = db._clock.now
    db._clock.now = lambda: (int((time.time() + 3600) * 1000) << 16)
    try:
        with pytest.raises(pykv.InvalidArgument, match=r"3,\d{3}\.\d s ahead of node \d's clock"):
            db.put("skewed", 1)
        with pytest.raises(pykv.InvalidArgument, match="ahead of node"):  # multi-shard: 2PC
            with db.transaction() as tx:
                for key in _keys_over_every_shard(db, "skewed-"):
                    tx.put(key, 1)
    finally:
        db._clock.now = honest
    assert db.get("skewed") is None and db.get_many(_keys_over_every_shard(db, "skewed-")) == {
        k: None for k in _keys_over_every_shard(db, "skewed-")
    }
    db.put("skewed", 2)
    assert db.get("skewed") == 2


def test_a_cluster_backup_under_writers_is_one_moment_of_every_shard(db, tmp_path):
    """db.backup() of a cluster while 4 threads move money between 40 accounts spread over
    every shard (each transfer a 2-shard transaction): each copy is an embedded store that
    opens, its accounts add up, it holds every commit acknowledged before the call, and keys
    deleted before it are absent."""
    accounts = [f"bk-acct{i:02d}" for i in range(40)]
    with db.transaction() as tx:
        for account in accounts:
            tx.put(account, 100)
    db.put("bk-deleted", "x")
    db.delete("bk-deleted")
    db.put("bk-big", b"v" * 600_000)  # pages hold whole values, however big
    copies = [tmp_path / f"copy{n}" for n in range(4)]
    for progress in backups_while_moving(db, accounts, copies, "bk-acknowledged-"):
        assert progress[-1] == (8, 8)  # every shard
    for n, copy in enumerate(copies):
        with pykv.open(copy) as backup:
            assert sum(backup.get(account) for account in accounts) == 100 * len(accounts)
            assert backup.get(f"bk-acknowledged-{n}") is not None
            assert backup.get("bk-deleted") is None and backup.get("bk-big") == b"v" * 600_000
            value, clock = backup.get_versioned("bk-big")
            assert clock == db.get_versioned("bk-big")[1]  # the cluster's clock, kept
            backup.put("the copy", "takes commits")
    with pytest.raises(pykv.InvalidArgument, match="is not empty: backup writes a new store"):
        db.backup(copies[0])
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]  # nothing half-written


def test_a_backup_whose_export_was_dropped_is_refused_then_taken_again(db, cluster, tmp_path):
    """An export a node no longer holds (dropped: idle, a restart) fails the pages that need
    it with TransactionConflict, and a new backup succeeds. A page asked again (its answer
    lost) is answered again, the same."""
    core, run = db.backend.core, db.backend._run

    def exports_under_way() -> int:  # as `pykv status` shows them
        return sum(fetch_status(address, 5)["exports"] for address in cluster.addresses)

    db.put("bk-page", "p")
    before = exports_under_way()
    export_id, begun = run(core.begin_export())
    assert exports_under_way() == before + len(begun)
    paged = ExportPass(export_id, {s: reply[0] for s, reply in enumerate(begun)}, KeyRange(""), None)
    sends = paged.sends()
    first = run(core.round(sends))
    assert run(core.round(sends)) == first and any(page for _, page, _ in first)
    run(core.round(paged.ends()))
    assert exports_under_way() == before
    with pytest.raises(TransactionConflict, match="export .* is gone"):
        paged.feed(run(core.round(sends)))
    db.put("bk-after", 1)
    db.backup(tmp_path / "copy")
    with pykv.open(tmp_path / "copy") as backup:
        assert backup.get("bk-after") == 1 and backup.get("bk-page") == "p"


def test_pykv_backup_of_a_cluster_writes_an_embedded_store(db, cluster, tmp_path):
    db.put("bk-cli", "yes")
    run = _cli("backup", str(tmp_path / "copy"), "--addresses", cluster.addresses[0])
    said = " ".join(run.stderr.split())
    assert run.returncode == 0, said
    assert f"a copy of {cluster.addresses[0]} holding" in said and "; it opens" in said
    with pykv.open(tmp_path / "copy") as backup:
        assert backup.get("bk-cli") == "yes"
    run = _cli("backup", str(tmp_path / "copy"), "--addresses", cluster.addresses[0])
    assert run.returncode == 2 and "is not empty" in " ".join(run.stderr.split())


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pykv.server.cli", *args],
        capture_output=True, text=True, timeout=60,
    )


@pytest.mark.parametrize("options, said", [
    (["--initial", "1,2"], "--initial names nodes [2] that --peers gives no address"),
    (["--listen", "nonsense"], "address 'nonsense' is not 'host:port'"),
    (["--partitions", "0"], "partitions must be a positive int, got 0"),
    (["--id", "0"], "a node id is a positive int, not '0'"),
    (["--peers", "0=127.0.0.1:1"], "a peer must be ID=HOST:PORT with ID >= 1"),
    (["--cluster-id", "prod eu"], "a cluster id is 1-64 letters, digits"),
])
def test_serve_refuses_options_that_cannot_make_a_node_in_one_line(tmp_path, options, said):
    # Before: a traceback, or (--initial naming a node without an address, --id 0) a node
    # that served groups which could never elect a leader.
    base = ["serve", "--id", "1", "--listen", "127.0.0.1:1", "--data-dir", str(tmp_path / "n")]
    run = _cli(*base, *options)
    assert run.returncode == 2 and said in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("options, said", [
    (["--nodes", "0"], "argument --nodes: must be at least 1, not 0"),
    (["--base-port", "65534"], "--base-port 65534 leaves no port for node 3"),
    (["--partitions", "0"], "argument --partitions: must be at least 1, not 0"),
])
def test_cluster_up_refuses_options_that_cannot_make_a_cluster(tmp_path, options, said):
    # --nodes 0 said "cluster ready:" with no node, and saved a cluster.json of none.
    run = _cli("cluster", "up", "--data-dir", str(tmp_path / "c"), *options)
    assert run.returncode == 2 and said in " ".join(run.stderr.split())
    assert not (tmp_path / "c" / "cluster.json").exists()


def test_a_node_lifts_its_soft_limit_on_open_files_to_the_hard_one(tmp_path):
    import resource

    from cluster_harness import free_port_range

    def low_soft_limit() -> None:  # the common default, under a higher hard limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    port = free_port_range(1)
    node = subprocess.Popen(
        [sys.executable, "-m", "pykv.server.cli", "serve", "--id", "1", "--listen", f"127.0.0.1:{port}",
         "--partitions", "1", "--replicas", "1", "--data-dir", str(tmp_path / "n")],
        preexec_fn=low_soft_limit, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "the node never listened"
            time.sleep(0.05)
        limits = Path(f"/proc/{node.pid}/limits").read_text()
        soft, hard = next(line.split()[3:5] for line in limits.splitlines() if line.startswith("Max open files"))
        assert soft == hard and soft != "256"
    finally:
        node.terminate()
        node.wait(10)


def test_serve_refuses_a_file_as_its_data_dir(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    run = _cli("serve", "--id", "1", "--listen", "127.0.0.1:1", "--data-dir", str(tmp_path / "notes.txt"))
    assert run.returncode == 2 and f"{tmp_path / 'notes.txt'} is a file, not a store's directory" in run.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_cli_put_get_txn_and_status(cluster):
    addr = cluster.addresses[0]
    assert _cli("put", "cli:n", "41", "--type", "int", "--addresses", addr).returncode == 0
    done = _cli("txn", "get:cli:n", "incr:cli:n=1", "get:cli:n", "put:cli:s=hi", "--addresses", addr)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"0:cli:n": 41, "2:cli:n": 42}
    got = _cli("get", "cli:s", "--addresses", cluster.addresses[2])
    assert (got.returncode, got.stdout.strip()) == (0, '"hi"')
    assert _cli("get", "cli:absent", "--addresses", addr).returncode == 1
    for flags in ([], ["--plain"]):
        listed = _cli("scan", "cli:", *flags, "--addresses", addr)
        assert listed.returncode == 0, listed.stderr
        assert [json.loads(line) for line in listed.stdout.splitlines()] == [
            {"key": "cli:n", "value": 42}, {"key": "cli:s", "value": "hi"}
        ]
    listed = _cli("scan", "cli:", "--start", "cli:o", "--limit", "1", "--addresses", addr)
    assert [json.loads(line)["key"] for line in listed.stdout.splitlines()] == ["cli:s"]
    # Options first: --addresses takes one or more values, and hands the key back.
    assert _cli("put", "--addresses", *cluster.addresses, "cli:m", "7").returncode == 0
    got = _cli("get", "--addresses", addr, cluster.addresses[1], "cli:m")
    assert (got.returncode, got.stdout.strip()) == (0, '"7"')
    listed = _cli("scan", "--addresses", addr, "cli:m")
    assert [json.loads(line)["key"] for line in listed.stdout.splitlines()] == ["cli:m"]
    every = _cli("scan", "--addresses", *cluster.addresses).stdout.splitlines()  # no prefix
    assert {"cli:m", "cli:n", "cli:s"} <= {json.loads(line)["key"] for line in every}
    no_key = _cli("get", "--addresses", addr)
    assert no_key.returncode == 2 and "needs KEY" in no_key.stderr
    # A name that is not UTF-8 text (bytes 0xff from the shell) is refused, and says why.
    bad = _cli("put", "\udcff", "v", "--addresses", addr)
    assert bad.returncode == 2 and "InvalidKey" in bad.stderr and "Traceback" not in bad.stderr
    status = _cli("status", "--json", "--addresses", *cluster.addresses)
    assert status.returncode == 0
    assert len(json.loads(status.stdout)) == 3
    table = _cli("status", "--addresses", addr)
    assert table.returncode == 0 and "meta" in table.stdout and "leader" in table.stdout
    assert "prepared" in table.stdout  # transactions holding locks, per replica
    assert "unfinished" in table.stdout  # commits some participant has not applied yet
    assert "WAL MB" in table.stdout and "cache hits" in table.stdout  # the table of nodes
    assert "RSS MB" in table.stdout and "longest step" in table.stdout
    for node in json.loads(_cli("status", "--json", "--addresses", addr).stdout).values():
        assert node["wal"]["segments"] >= 1 and node["wal"]["bytes"] > 0
        assert node["cache"]["capacity_bytes"] == 64 << 20
        assert node["rss_bytes"] > 10 << 20
        driver = node["driver"]  # it has applied the puts above: steps were timed
        assert driver["steps"] > 0 and 0 < driver["mean_ms"] <= driver["max_ms"]
        assert len(node["gc"]["collections"]) == 3
    # one address is enough: status finds the other nodes through the shard map
    status = _cli("status", "--json", "--addresses", cluster.addresses[1])
    assert status.returncode == 0
    assert sorted(json.loads(status.stdout)) == sorted(cluster.addresses)


def _raw_connection(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=5)


def _frames_until_closed(sock: socket.socket) -> list:
    """The frames the node sends until it closes the connection (None if it never does)."""
    from pykv.net.framing import FrameDecoder

    decoder, frames = FrameDecoder(), []
    sock.settimeout(5)
    try:
        while data := sock.recv(65536):
            frames.extend(decoder.feed(data))
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        return None
    return frames


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        (b"GET / HTTP/1.1\r\n\r\n" * 4, "exceeds max_frame"),  # not a HELLO frame at all
        (struct.pack(">IB", 1 << 30, 16), "frame length 1073741824 exceeds max_frame"),
        (struct.pack(">IB", 5, 16) + b"\xc1\xc1\xc1\xc1\xc1", "undecodable msgpack"),
    ],
    ids=["not-pykv", "oversized", "malformed"],
)
def test_a_bad_frame_closes_only_its_connection(cluster, db, garbage, reason):
    from pykv.net.framing import ERROR, hello_frame

    sock = _raw_connection(cluster.addresses[0])
    try:
        if not garbage.startswith(b"GET"):
            sock.sendall(hello_frame())
        sock.sendall(garbage)
        frames = _frames_until_closed(sock)
    finally:
        sock.close()
    assert frames is not None, "the node kept the connection open"
    assert frames[-1].kind == ERROR and reason in frames[-1].body["message"]  # it says why
    db.put("after-garbage", 1)  # the node and every other connection carry on
    assert db.get("after-garbage") == 1
    assert "closing connection" in cluster.log_text(1)
    assert reason in cluster.log_text(1)


@pytest.mark.parametrize("cluster_id, reason", [
    (None, "Raft messages from a peer that named no cluster"),  # a client's HELLO
    ("another-cluster", "cluster 'another-cluster' (the connecting side) is not cluster"),
])
def test_raft_messages_from_outside_the_cluster_are_refused(cluster, db, cluster_id, reason):
    # A vote request in a term far ahead: stepped, it would depose shard 0's leader.
    from pykv.client.transport import RAFT
    from pykv.net.framing import ERROR, encode_frame, hello_frame
    from pykv.raft.messages import Message, MsgType

    term = cluster.status(1)["groups"]["0"]["term"]
    vote = Message(MsgType.VOTE, to=1, frm=2, term=term + 100, log_term=term + 99, index=10**9, group=0)
    sock = _raw_connection(cluster.addresses[0])
    try:
        sock.sendall(hello_frame(cluster=cluster_id) + encode_frame(RAFT, [2, [vote.to_wire()]]))
        frames = _frames_until_closed(sock)
    finally:
        sock.close()
    assert frames is not None, "the node kept the connection open"
    assert frames[-1].kind == ERROR and reason in frames[-1].body["message"]
    assert reason in cluster.log_text(1)
    assert cluster.status(1)["groups"]["0"]["term"] < term + 100
    db.put("after-outsider", 1)
    assert db.get("after-outsider") == 1


def test_a_truncated_frame_is_logged_and_harms_nothing(cluster, db):
    from pykv.net.framing import encode_frame, hello_frame

    sock = _raw_connection(cluster.addresses[2])
    sock.sendall(hello_frame() + encode_frame(17, None, request_id=1)[:-1])
    sock.recv(64)  # the node's HELLO (closing with it unread would reset, not end, the stream)
    sock.close()
    deadline = time.monotonic() + 10
    while "ended badly" not in cluster.log_text(3) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "ended badly" in cluster.log_text(3)
    assert db.get("after-garbage", "gone") in (1, "gone")


def test_a_backup_restores_into_an_empty_cluster_and_overwrite_finishes_one(cluster_addresses, tmp_path):
    """`pykv backup` then `pykv restore` into the wiped cluster: every key and value back,
    with its clock (a context a client kept from before the backup still matches), deleted
    keys absent, and the resolvers registered on the cluster (a wipe forgets them): a merge
    that needs one merges. A cluster that holds keys is refused, nothing written, unless
    --overwrite (the backup's keys replace the cluster's, with clocks no earlier context
    matches; its other keys stay)."""
    from cluster_harness import wipe_cluster

    wipe_cluster(cluster_addresses)
    address = cluster_addresses[0]
    expected = {f"rs{i:04d}": (i if i % 3 else [f"item{i}", i, b"b"]) for i in range(1_200)}
    expected["rs-big"] = b"z" * 300_000
    expected["rs-count/n"] = 5
    with pykv.connect([address]) as db:
        db.register_resolver("rs-count/", "counter")
        db.register_resolver("rs-set/", "union")
        for start in range(0, len(expected), 400):
            with db.transaction() as tx:
                for key in list(expected)[start:start + 400]:
                    tx.put(key, expected[key])
        db.put("rs-deleted", 1)
        db.delete("rs-deleted")
        kept = {key: db.get_versioned(key)[1] for key in ("rs0001", "rs0002", "rs-big")}
    assert _cli("backup", str(tmp_path / "bk"), "--addresses", address).returncode == 0
    wipe_cluster(cluster_addresses)

    run = _cli("restore", str(tmp_path / "bk"), "--addresses", address)
    assert run.returncode == 0, run.stderr
    listed = _cli("resolvers", "--addresses", address)
    assert json.loads(listed.stdout) == {"rs-count/": "counter", "rs-set/": "union"}, listed.stderr
    said = " ".join(run.stderr.split())
    assert f"restored {len(expected):,} keys" in said and "'rs-count/': counter, 'rs-set/': union" in said
    with pykv.connect([address]) as db:
        assert dict(db.scan(consistent=False)) == expected
        assert {key: db.get_versioned(key)[1] for key in kept} == kept
        db.put("rs0002", "after the restore", context=kept["rs0002"])  # the old context matches
        tx = db.transaction(isolation="merge")
        tx["rs-count/n"] = tx["rs-count/n"] + 1  # 5 -> 6, while another writer makes it 7
        db.put("rs-count/n", 7)
        tx.commit()  # the counter resolver: 7 + 6 - 5 (without it: TransactionConflict)
        assert db.get("rs-count/n") == 8
        db.put("rs-count/n", 5)
        db.put("rs0001", "changed")
        kept["changed"] = db.get_versioned("rs0001")[1]
        db.put("rs-extra", "kept")
    run = _cli("restore", str(tmp_path / "bk"), "--addresses", address)
    assert run.returncode == 2 and "holds keys" in " ".join(run.stderr.split())
    with pykv.connect([address]) as db:
        assert db.get("rs0001") == "changed"
    assert _cli("restore", str(tmp_path / "bk"), "--addresses", address, "--overwrite").returncode == 0
    with pykv.connect([address]) as db:
        assert db.get("rs0001") == 1 and db.get("rs-extra") == "kept"
        assert db.get("rs0002") == 2 and db.get("rs-big") == expected["rs-big"]
        for context in (kept["rs0001"], kept["changed"]):  # neither saw the value now there
            with pytest.raises(TransactionConflict):
                db.put("rs0001", "stale", context=context)
        assert db.get_versioned("rs-big")[1] == kept["rs-big"]  # unchanged since: loaded as it was
    forgot = _cli("resolvers", "--unset", "rs-set/", "--addresses", address)
    assert json.loads(forgot.stdout) == {"rs-count/": "counter"}, forgot.stderr


def test_bench_drives_the_cluster_and_prints_one_json_object(cluster_addresses, capsys):
    """`pykv bench --addresses` (coroutines on one pykv.aio client): the scripted interface."""
    from cluster_harness import wipe_cluster

    from pykv.server.cli import main

    wipe_cluster(cluster_addresses)
    args = ["bench", "--addresses", cluster_addresses[0], "--clients", "8", "--duration", "1",
            "--keys", "500", "--ops", "4", "--json"]
    assert main(args) == 0
    out = capsys.readouterr().out
    report = json.loads(out)
    assert out.strip().count("\n") == 0
    for field in ("tps", "p50_ms", "p99_ms", "aborts", "errors"):
        assert field in report
    assert report["committed"] > 0 and report["errors"] == 0
    assert report["clients"] == 8 and report["target"] == "cluster"
    with pykv.client.connect(cluster_addresses) as db:  # the preload and the workload's writes landed
        assert len(list(db.scan("bench/"))) == 500


def test_a_consistent_scan_past_its_budget_reads_exports_as_it_iterates_and_ends_them(cluster):
    """With max_scan_bytes below the range, a consistent scan returns its first items
    while the shards' exports of its moment are still under way (`pykv status` counts
    them), and writes made after that moment are not in it; read to its end, or left
    half-read (closed), no export stays under way."""
    def exports_under_way() -> int:
        return sum(fetch_status(address, 5)["exports"] for address in cluster.addresses)

    with pykv.client.connect(cluster.addresses, max_scan_bytes=4096) as db:
        keys = [f"stream/{i:03d}" for i in range(200)]
        value = "v" * 60_000  # 12 MB in all: more than a page (1 MiB) of every shard
        for batch in range(0, len(keys), 20):
            with db.transaction() as tx:
                for key in keys[batch:batch + 20]:
                    tx[key] = value
        before = exports_under_way()
        scan = db.scan("stream/")
        first = next(scan)
        assert first == (keys[0], value) and exports_under_way() > before
        db.put(keys[-1], "changed after the scan's moment")
        db.put("stream/zzz-new", "created after it")
        rest = list(scan)
        assert [k for k, _ in [first, *rest]] == keys and rest[-1][1] == value
        assert exports_under_way() == before
        half = db.scan("stream/")
        next(half)
        assert exports_under_way() > before
        half.close()
        deadline = time.monotonic() + 5
        while exports_under_way() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert exports_under_way() == before
