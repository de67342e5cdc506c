"""`pykv check NODE_DIR`: every value of a stopped node's shard replicas read back and decoded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster_harness import local_cluster  # noqa: E402

import pykv  # noqa: E402
from pykv.codec import encode_value  # noqa: E402
from pykv.storage import Storage, Update  # noqa: E402


def _check(path: Path) -> tuple[int, str, str]:
    run = subprocess.run([sys.executable, "-m", "pykv.server.cli", "check", str(path), "--json"],
                         capture_output=True, text=True, timeout=120)
    return run.returncode, run.stdout, " ".join(run.stderr.split())


def test_check_reads_a_stopped_nodes_replicas_and_names_a_damaged_value(tmp_path):
    with local_cluster(tmp_path, nodes=3, partitions=4) as cluster:
        with pykv.connect(cluster.addresses) as db:
            for i in range(300):
                db.put(f"k{i:04d}", f"value-{i}-" + "y" * 100)
        node = cluster.data_dir / "node-1"
        code, _, said = _check(node)
        assert code == 2 and "StoreLocked" in said and "stop the other node" in said
        cluster.down()
        code, out, _ = _check(node)
        assert code == 0 and json.loads(out) == {"keys": 300, "damaged": []}  # R=3: all here
        _refused_as_a_store(node, tmp_path)
        # A value stored wrongly, as the zstd race of earlier releases could (its checksum is
        # of the wrong bytes, so only decoding it tells).
        shard = next(g for g in (node / "shards").glob("g*") if _holds(g, b"k0123"))
        compressed = bytearray(encode_value("z" * 100_000))
        compressed[len(compressed) // 2] ^= 0xFF
        with Storage.open(str(shard), fsync="off", compaction=False) as storage:
            old = storage.get(b"k0123")
            storage.commit([Update(b"k0123", bytes(compressed), old.clock, old.timestamp)])
        code, out, said = _check(node)
        assert out, said
        report = json.loads(out)
        assert code == 1 and report["keys"] == 300
        assert [d["key"] for d in report["damaged"]] == [f"shard {shard.name[1:]}: k0123"]
        assert "bad zstd value" in report["damaged"][0]["error"]


def _holds(shard: Path, key: bytes) -> bool:
    with Storage.open(str(shard), fsync="off", compaction=False) as storage:
        return storage.get(key).value is not None


def _refused_as_a_store(node: Path, tmp_path: Path) -> None:
    """A stopped node's directory opened as an embedded store (read-only or not), salvaged, or
    read by `pykv get --data-dir`: refused as a node's, nothing written in it or beside it
    (before, its node log read as damaged records and salvage was suggested)."""
    before = sorted(p.name for p in node.iterdir())
    for read_only in (False, True):
        with pytest.raises(pykv.InvalidArgument, match="is a cluster node's data directory"):
            pykv.open(node, read_only=read_only)
    for argv in (["salvage", str(node), str(tmp_path / "salvaged")], ["get", "k0001", "--data-dir", str(node)]):
        run = subprocess.run([sys.executable, "-m", "pykv.server.cli", *argv], capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 2 and "cluster node's data directory" in " ".join(run.stderr.split())
    assert sorted(p.name for p in node.iterdir()) == before and not (tmp_path / "salvaged").exists()
