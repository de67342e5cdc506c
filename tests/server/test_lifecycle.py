"""`pykv cluster up/down` on real processes: pids in DIR, restart with data, only missing nodes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster_harness import free_port_range  # noqa: E402

import pykv.client  # noqa: E402
from pykv.server.cmd_cluster import load_config, read_pid, running_nodes  # noqa: E402


def _pykv(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pykv.server.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_up_down_up_keeps_data_and_restarts_only_missing_nodes(tmp_path):
    data = tmp_path / "c"
    base = free_port_range(3)
    try:
        up = _pykv("cluster", "up", "--nodes", "3", "--data-dir", str(data), "--base-port", str(base),
                   "--partitions", "4")
        assert up.returncode == 0, up.stderr
        assert "3 nodes, 3 replicas asked: each shard has 3 and survives 1 failed node" in up.stderr
        config = load_config(data)
        assert sorted(config.nodes.values()) == [f"127.0.0.1:{base + i}" for i in range(3)]
        pids = {n: read_pid(data, n) for n in (1, 2, 3)}
        assert running_nodes(config, data) == pids

        with pykv.client.connect([f"127.0.0.1:{base + 2}"]) as db:
            for i in range(20):
                db.put(f"k{i}", i)

        # Kill one node: a second `up` starts it and leaves the others alone.
        subprocess.run(["kill", "-9", str(pids[2])], check=True)
        down_row = json.loads(_pykv("status", "--json", "--addresses", f"127.0.0.1:{base}").stdout)
        assert down_row[f"127.0.0.1:{base + 1}"].startswith("node 2: Unavailable: cannot connect")
        table = _pykv("status", "--addresses", f"127.0.0.1:{base}").stdout.splitlines()
        assert any(f"│ 127.0.0.1:{base + 1} │ - │ down (Unavailable: cannot" in " ".join(row.split()) for row in table)
        again = _pykv("cluster", "up", "--nodes", "3", "--data-dir", str(data), "--base-port", str(base))
        assert again.returncode == 0, again.stderr
        now = running_nodes(config, data)
        assert now[1] == pids[1] and now[3] == pids[3] and now[2] != pids[2]

        # A node paused by SIGSTOP still shuts down cleanly: `down` resumes it after SIGTERM
        # (it was killed once `down` gave up waiting, 10 s later).
        os.kill(now[2], signal.SIGSTOP)
        down = _pykv("cluster", "down", "--data-dir", str(data))
        assert down.returncode == 0 and "killed" not in down.stderr
        assert running_nodes(config, data) == {}
        assert "event=stopped node=2" in (data / "node-2.log").read_text()

        # Up again: the same cluster with its data.
        assert _pykv("cluster", "up", "--nodes", "3", "--data-dir", str(data), "--base-port",
                     str(base)).returncode == 0
        with pykv.client.connect([f"127.0.0.1:{base}"]) as db:
            assert [db.get(f"k{i}") for i in range(20)] == list(range(20))

        # A damaged cluster.json: one line, exit 2 (a traceback before). Made again over the
        # nodes' directories (node 3's lost too), the cluster keeps its id and data, and the
        # empty node rejoins instead of founding its groups again.
        cluster_id = load_config(data).cluster_id
        assert _pykv("cluster", "down", "--data-dir", str(data)).returncode == 0
        (data / "cluster.json").write_text('{"nodes": {"1": ')
        broken = _pykv("cluster", "up", "--nodes", "3", "--data-dir", str(data), "--base-port", str(base))
        assert broken.returncode == 2 and "Traceback" not in broken.stderr
        assert "is not a cluster config as `pykv cluster up` writes it" in " ".join(broken.stderr.split())
        (data / "cluster.json").unlink()
        shutil.rmtree(data / "node-3")
        remade = _pykv("cluster", "up", "--nodes", "3", "--data-dir", str(data), "--base-port", str(base),
                       "--partitions", "4")
        assert remade.returncode == 0, remade.stderr
        assert load_config(data).cluster_id == cluster_id
        assert "event=lost_data node=3" in (data / "node-3.log").read_text()
        with pykv.client.connect([f"127.0.0.1:{base + 2}"]) as db:
            assert [db.get(f"k{i}") for i in range(20)] == list(range(20))
    finally:
        _pykv("cluster", "down", "--data-dir", str(data))


def test_up_reports_a_node_that_cannot_start_at_once(tmp_path):
    """A node whose port another program holds exits at once: `cluster up` says so, with the
    node's own error, instead of waiting its whole timeout for leaders."""
    data = tmp_path / "c"
    base = free_port_range(3)
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", base + 1))  # node 2's port
    squatter.listen()
    try:
        started = time.monotonic()
        up = _pykv("cluster", "up", "--nodes", "3", "--data-dir", str(data), "--base-port", str(base),
                   "--timeout", "60")
        assert up.returncode == 1
        assert time.monotonic() - started < 30
        assert "node 2" in up.stderr and "exited" in up.stderr
        assert "address already in use" in " ".join(up.stderr.split())  # rich wraps lines
        squatter.close()
        # Node 2 never ran: it founds its groups like the others did (it never voted).
        again = _pykv("cluster", "up", "--nodes", "3", "--data-dir", str(data), "--base-port", str(base))
        assert again.returncode == 0, again.stderr
        assert load_config(data).formed
    finally:
        squatter.close()
        _pykv("cluster", "down", "--data-dir", str(data))


def test_a_config_saved_before_formed_existed_counts_as_formed_once_a_node_ran(tmp_path):
    """Upgrading: a cluster.json without `formed` whose nodes have WALs ran, so a node found
    empty later must rejoin (`--existing`) rather than found its groups again."""
    raw = {"nodes": {"1": "127.0.0.1:7401", "2": "127.0.0.1:7402"}, "initial": [1, 2]}
    (tmp_path / "cluster.json").write_text(json.dumps(raw))
    assert not load_config(tmp_path).formed  # nothing ever ran
    (tmp_path / "node-2" / "wal").mkdir(parents=True)
    assert load_config(tmp_path).formed
    (tmp_path / "cluster.json").write_text(json.dumps({**raw, "formed": False}))
    assert not load_config(tmp_path).formed  # a config that says so is believed


def _status(address: str) -> dict:
    """The node at ``address`` as `pykv status --json` shows it."""
    out = _pykv("status", "--json", "--addresses", address)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)[address]


def test_a_node_that_lost_its_data_rejoins_its_groups_as_a_new_replica(tmp_path):
    """Node 3's WAL is lost (its terms and votes with it), or its shard storage is lost
    behind its snapshots: either way it refuses to start, and says how to rebuild it. Then its whole data directory goes (as after a dead disk is replaced):
    `cluster up` brings it back empty, and it must not found its groups again (its Raft
    terms and votes are gone). It leaves each group and is added back as a learner, filled
    by a snapshot, then promoted: every replica it hosts ends with the leader's keys and
    applied index."""
    data = tmp_path / "c"
    base = free_port_range(3)
    try:
        up = _pykv("cluster", "up", "--nodes", "3", "--data-dir", str(data), "--base-port", str(base),
                   "--partitions", "4", "--snapshot-every", "20")
        assert up.returncode == 0, up.stderr
        with pykv.client.connect([f"127.0.0.1:{base}"]) as db:
            for i in range(200):
                db.put(f"k{i}", i)
        _kill_node_3(data, copy_to=tmp_path / "node-3-copy")
        for lost, complaint in (("wal", "lost its Raft log"), ("shards", "behind its snapshot")):
            shutil.rmtree(data / "node-3")
            shutil.copytree(tmp_path / "node-3-copy", data / "node-3")
            shutil.rmtree(data / "node-3" / lost)
            damaged = _pykv("cluster", "up", "--nodes", "3", "--data-dir", str(data), "--base-port", str(base))
            assert damaged.returncode == 1
            said = " ".join(damaged.stderr.split())  # rich wraps lines
            assert complaint in said and "To rebuild this node from the other replicas" in said
        shutil.rmtree(data / "node-3")
        with pykv.client.connect([f"127.0.0.1:{base}"]) as db:
            for i in range(200, 300):
                db.put(f"k{i}", i)  # what node 3 never saw, even before it lost its data
        again = _pykv("cluster", "up", "--nodes", "3", "--data-dir", str(data), "--base-port", str(base))
        assert again.returncode == 0, again.stderr
        log = (data / "node-3.log").read_text()
        assert "event=lost_data" in log and "left the group" in log
        mine = _node_3_caught_up(base, 60)[3]["groups"]
        assert sum(g["keys"] for gid, g in mine.items() if gid != "meta") == 300
        with pykv.client.connect([f"127.0.0.1:{base + 2}"]) as db:
            assert [db.get(f"k{i}") for i in range(300)] == list(range(300))
    finally:
        _pykv("cluster", "down", "--data-dir", str(data))


def test_a_node_restored_from_an_older_copy_of_its_directory_is_reported_and_caught_up(tmp_path):
    """Node 3's directory is copied while it is stopped; it runs on and acknowledges more
    entries; then it is stopped and the old copy put back. Each leader finds it refusing
    what follows entries it had acknowledged: it says so in its log (and `pykv status`
    counts it), forgets what it knew of that follower, and catches it up. (Before, every
    leader kept sending it the entries after what it had acknowledged, which it refused,
    more of them at every heartbeat, and it never caught up.)"""
    data = tmp_path / "c"
    base = free_port_range(3)
    up = ("cluster", "up", "--nodes", "3", "--data-dir", str(data), "--base-port", str(base))
    try:
        # No snapshot in between: the leaders still hold every entry node 3 lacks, so they
        # send it appends (a leader that compacted them sends a snapshot, which heals it).
        assert _pykv(*up, "--partitions", "4", "--snapshot-every", "100000").returncode == 0
        with pykv.client.connect([f"127.0.0.1:{base}"]) as db:
            for i in range(100):
                db.put(f"k{i}", i)
            _kill_node_3(data, copy_to=tmp_path / "node-3-copy")
            assert _pykv(*up).returncode == 0
            for i in range(100, 200):
                db.put(f"k{i}", i)  # node 3 acknowledges these, then loses them
            _kill_node_3(data)
            shutil.rmtree(data / "node-3")
            shutil.copytree(tmp_path / "node-3-copy", data / "node-3")
            assert _pykv(*up).returncode == 0
            for i in range(200, 300):
                db.put(f"k{i}", i)
        statuses = _node_3_caught_up(base, 30)
        reported = sum(st["counters"].get("followers_behind_their_acks", 0) for st in statuses.values())
        logs = "".join((data / f"node-{n}.log").read_text() for n in (1, 2))
        assert reported >= 1 and "event=follower_lost_entries" in logs and "follower=3" in logs
        shown = " ".join(_pykv("status", "--addresses", f"127.0.0.1:{base}").stdout.split())
        assert "a follower holding less than it had acknowledged" in shown
        with pykv.client.connect([f"127.0.0.1:{base + 2}"]) as db:
            assert [db.get(f"k{i}") for i in range(300)] == list(range(300))
    finally:
        _pykv("cluster", "down", "--data-dir", str(data))


def _kill_node_3(data: Path, copy_to: Path | None = None) -> None:
    """SIGKILL node 3 of the cluster in ``data``; then copy its directory to ``copy_to``."""
    subprocess.run(["kill", "-9", str(read_pid(data, 3))], check=True)
    time.sleep(0.5)
    if copy_to is not None:
        shutil.copytree(data / "node-3", copy_to)


def _node_3_caught_up(base: int, seconds: float) -> dict[int, dict]:
    """Wait until every replica node 3 hosts has its leader's applied index and keys (else
    fail, showing them); each node's status then."""
    deadline = time.monotonic() + seconds
    while True:
        statuses = {n: _status(f"127.0.0.1:{base + n - 1}") for n in (1, 2, 3)}
        leaders = {gid: g for st in statuses.values() for gid, g in st["groups"].items()
                   if g["role"].startswith("leader")}
        mine = statuses[3]["groups"]
        caught_up = sorted(mine) == sorted(leaders) and all(
            (mine[gid]["applied"], mine[gid]["keys"]) == (g["applied"], g["keys"]) for gid, g in leaders.items()
        )
        if caught_up:
            return statuses
        assert time.monotonic() < deadline, {gid: (mine.get(gid), leaders[gid]) for gid in leaders}
        time.sleep(0.5)


def test_remove_below_the_replica_count_says_what_is_left(tmp_path):
    data = tmp_path / "c"
    base = free_port_range(3)
    try:
        assert _pykv("cluster", "up", "--nodes", "3", "--data-dir", str(data), "--base-port", str(base),
                     "--partitions", "2").returncode == 0
        removed = _pykv("cluster", "remove", "--data-dir", str(data), "--node", "3", "--timeout", "60")
        said = " ".join(removed.stderr.split())
        assert removed.returncode == 0 and "node 3 removed" in said
        assert "2 nodes, 3 replicas asked: each shard has 2 and survives 0 failed nodes" in said
        with pykv.client.connect([f"127.0.0.1:{base}"]) as db:
            db.put("after", 1)
            assert db.get("after") == 1
        status = _pykv("status", "--json", "--addresses", f"127.0.0.1:{base}")
        assert status.returncode == 0  # node 3 is gone from the ring: not a node down
        assert sorted(json.loads(status.stdout)) == [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"]
    finally:
        _pykv("cluster", "down", "--data-dir", str(data))
