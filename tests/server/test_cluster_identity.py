"""Cluster identity on real processes: nodes and clients refuse peers of another cluster, and a
data directory serves one node process at a time, never as another cluster's node or as
another node."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster_harness import LocalCluster, free_port_range, local_cluster  # noqa: E402

import pykv  # noqa: E402
from pykv import WrongCluster  # noqa: E402
from pykv.client.admin import fetch_status  # noqa: E402
from pykv.server.cmd_cluster import CONFIG_NAME, load_config  # noqa: E402

KEYS = [f"k{i}" for i in range(40)]


def _serve(*args: str, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - the child keeps it
    return subprocess.Popen([sys.executable, "-m", "pykv.server.cli", "serve", *args],
                            stdout=out, stderr=subprocess.STDOUT)


def _serve_refused(*args: str) -> str:
    run = subprocess.run([sys.executable, "-m", "pykv.server.cli", "serve", *args],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    return run.stderr


def _wait_for(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} within {timeout}s"
        time.sleep(0.05)


def _write_all(addresses: list[str], value: str) -> None:
    with pykv.connect(addresses, timeout=10) as db, db.transaction() as tx:
        for key in KEYS:
            tx.put(key, value)


def _values(addresses: list[str]) -> Counter:
    with pykv.connect(addresses, timeout=10) as db:
        return Counter(db.get_many(KEYS).values())


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_a_client_never_talks_on_to_another_cluster_started_on_its_ports(tmp_path):
    # Before: the old client read and wrote cluster B as if it were A.
    a = LocalCluster(tmp_path / "a", 3, partitions=2)
    b = LocalCluster(tmp_path / "b", 3, partitions=2)
    b.base_port = a.base_port
    try:
        a.up()
        with pykv.connect(a.addresses) as old:
            old.put("k", "a")
            a.down()
            b.up()
            assert load_config(b.data_dir).cluster_id != load_config(a.data_dir).cluster_id
            with pykv.connect(b.addresses) as new:
                assert new.get("k") is None
                new.put("k", "b")
            with pytest.raises(WrongCluster, match="a node of another cluster answers there"):
                old.get("k")
            with pytest.raises(WrongCluster):
                old.put("k", "written by a client of A")
        with pykv.connect(b.addresses) as new:
            assert new.get("k") == "b"
    finally:
        a.down()
        b.down()


def test_a_node_of_another_cluster_in_a_members_place_changes_nothing(tmp_path):
    """Cluster A's node 3 started where cluster B's node 3 was (its address, its id) with
    A's data. A's Raft terms are ahead of B's, so had B's nodes taken its messages it would
    have won elections in B's groups and overwritten B's entries with A's (before the fix:
    21 of 50 keys read A's values, for good)."""
    a = LocalCluster(tmp_path / "a", 3, partitions=4)
    b = LocalCluster(tmp_path / "b", 3, partitions=4)
    try:
        a.up()
        for _ in range(4):  # each restart elects every group again: A's terms move ahead
            a.down()
            a.up()
        _write_all(a.addresses, "A")
        a.down()
        b.up()
        _write_all(b.addresses, "B")
        b.kill(3)
        rogue_log = tmp_path / "rogue.log"
        peers = ",".join(f"{n}={b.address(n)}" for n in (1, 2, 3))
        rogue = _serve("--id", "3", "--listen", b.address(3), "--peers", peers, "--partitions", "4",
                       "--data-dir", str(a.data_dir / "node-3"), log=rogue_log)
        try:
            _wait_for(lambda: "(the connecting side) is not cluster" in rogue_log.read_text(errors="replace"),
                      "the other cluster's node saw itself refused")
            time.sleep(2.0)  # many election timeouts of its groups
            assert _values(b.addresses) == {"B": len(KEYS)}
        finally:
            _stop(rogue)
        assert "(the connecting side) is not cluster" in b.log_text(1) + b.log_text(2)
        b.up()  # the real node 3 is back
        assert _values(b.addresses) == {"B": len(KEYS)}
        a.up()  # A's own node 3, refused by B, still holds A's data
        assert _values(a.addresses) == {"A": len(KEYS)}
    finally:
        a.down()
        b.down()


def test_misconfigured_processes_stop_before_they_harm_the_cluster(tmp_path):
    """A copied command line: another `pykv serve --id 2 --existing` with an empty directory at
    another address. Before: taking itself for node 2 after a data loss, it removed the real
    node 2 from every group, again each time the cluster added it back."""
    with local_cluster(tmp_path, nodes=3, partitions=4) as cluster:
        _write_all(cluster.addresses, "v")
        peers = ",".join(f"{n}={cluster.address(n)}" for n in (1, 3))
        twin_address = f"127.0.0.1:{free_port_range(1)}"
        log = tmp_path / "twin.log"
        twin = _serve("--id", "2", "--listen", twin_address, "--peers", f"{peers},2={twin_address}",
                      "--partitions", "4", "--existing", "--cluster-id", cluster.config.cluster_id,
                      "--data-dir", str(tmp_path / "twin"), log=log)
        try:
            assert twin.wait(30) == 2
        finally:
            _stop(twin)
        said = log.read_text()
        assert f"event=duplicate_node node=2: node 2 already runs at {cluster.address(2)}" in said
        assert "left the group" not in said
        groups = cluster.status(2)["groups"]
        assert len(groups) == 4 and all(g["role"] in ("leader", "follower") for g in groups.values())
        assert _values(cluster.addresses) == {"v": len(KEYS)}

        # A new node given another partition count than the cluster's: its replicas would
        # remember another number of txids than their peers, and diverge from them.
        log = tmp_path / "node4.log"
        address = f"127.0.0.1:{free_port_range(1)}"
        node4 = _serve("--id", "4", "--listen", address, "--peers", f"{peers},4={address}",
                       "--partitions", "8", "--cluster-id", cluster.config.cluster_id,
                       "--data-dir", str(tmp_path / "node4"), log=log)
        try:
            assert node4.wait(30) == 2
        finally:
            _stop(node4)
        assert "event=wrong_partitions node=4: the cluster has 4 partitions" in log.read_text()
        assert 4 not in fetch_status(cluster.address(1), timeout=5)["map_nodes"]


def test_a_client_of_the_release_before_cluster_ids_still_talks_to_a_node(tmp_path):
    """Such a client sends a 2-item HELLO and reads only a 2-item one back."""
    import socket

    from pykv.client.transport import PING
    from pykv.net.framing import RESPONSE, FrameDecoder, encode_frame, hello_frame

    old_hello = hello_frame()  # [b"PYKV", 1]: the bytes of that release
    with local_cluster(tmp_path, nodes=3, partitions=2) as cluster:
        host, port = cluster.address(1).rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(old_hello + encode_frame(PING, None, request_id=1))
            decoder, frames = FrameDecoder(), []
            while len(frames) < 2:
                frames += decoder.feed(sock.recv(65536))
        assert encode_frame(frames[0].kind, frames[0].body) == old_hello
        assert frames[1].kind == RESPONSE and frames[1].request_id == 1


def test_a_data_directory_serves_only_its_own_cluster_and_node(tmp_path):
    port = free_port_range(1)
    data = tmp_path / "n1"
    log = tmp_path / "n1.log"
    node = ["--listen", f"127.0.0.1:{port}", "--partitions", "1", "--replicas", "1", "--data-dir", str(data)]
    first = _serve("--id", "1", *node, "--cluster-id", "one", log=log)
    try:
        _wait_for(lambda: "listening" in log.read_text(errors="replace"), "the node listening")
        assert fetch_status(f"127.0.0.1:{port}", timeout=5)["cluster_id"] == "one"
        # A second process on the same directory (another port): before, it replayed and
        # wrote to the WAL the first one was appending to.
        other = ["--listen", f"127.0.0.1:{free_port_range(1)}", "--partitions", "1", "--replicas", "1"]
        said = _serve_refused("--id", "1", *other, "--data-dir", str(data))
        assert f"StoreLocked: {data} is already open (lock {data / 'LOCK'} held by pid {first.pid})" in said
    finally:
        _stop(first)
    said = _serve_refused("--id", "1", *node, "--cluster-id", "two")
    assert f"{data} belongs to cluster 'one', not to cluster 'two'" in said
    said = _serve_refused("--id", "2", "--peers", f"2=127.0.0.1:{port}", *node)
    assert f"{data} holds the data of node 1, not of node 2: start it as --id 1" in said
    said = _serve_refused("--id", "1", *node, "--partitions", "2")  # the last one wins
    assert f"{data} belongs to a cluster whose partitions are fixed at 1 for its life, not 2" in said
    again = _serve("--id", "1", *node, log=log)  # no --cluster-id: the directory's
    try:
        _wait_for(lambda: log.read_text(errors="replace").count("listening") == 2, "the node restarted")
        assert fetch_status(f"127.0.0.1:{port}", timeout=5)["cluster_id"] == "one"
    finally:
        _stop(again)


def test_cluster_up_keeps_the_id_its_nodes_record_when_cluster_json_has_none(tmp_path):
    # A cluster.json from a release before cluster ids, over nodes that record one.
    cluster = LocalCluster(tmp_path / "c", 3, partitions=2)
    try:
        cluster.up()
        cluster_id = cluster.config.cluster_id
        assert len(cluster_id) == 16
        identity = json.loads((cluster.data_dir / "node-2" / "IDENTITY").read_text())
        assert identity == {"cluster": cluster_id, "node": 2, "partitions": 2}
        cluster.down()
        path = cluster.data_dir / CONFIG_NAME
        raw = json.loads(path.read_text())
        del raw["cluster_id"]
        path.write_text(json.dumps(raw))
        cluster.up()
        assert cluster.config.cluster_id == cluster_id
        assert fetch_status(cluster.address(1), timeout=5)["cluster_id"] == cluster_id
        status = subprocess.run([sys.executable, "-m", "pykv.server.cli", "status", "--addresses",
                                 cluster.address(1)], capture_output=True, text=True, timeout=60)
        assert f"pykv nodes of cluster {cluster_id}" in status.stdout
    finally:
        cluster.down()


def test_status_names_the_cluster_and_flags_nodes_of_two():
    from rich.console import Console

    from pykv.server.cmd_status import build_node_table

    def title(statuses: dict) -> str:
        console = Console(width=200, record=True)
        console.print(build_node_table(statuses))
        return console.export_text().splitlines()[0].strip()

    node = {"node_id": 1, "cluster_id": "c1"}
    assert title({"a:1": node, "a:2": {**node, "node_id": 2}, "a:3": "node 3: Unavailable"}) == (
        "pykv nodes of cluster c1")
    assert title({"a:1": node, "b:1": {**node, "cluster_id": "c2"}}) == (
        "pykv nodes of 2 different clusters: c1, c2")

