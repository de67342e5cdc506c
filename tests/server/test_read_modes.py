"""`cluster up --reads lease`: the read mode reaches every node, survives a restart, and reads
still see every acknowledged commit (the default stays "safe", ReadIndex)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster_harness import local_cluster  # noqa: E402

import pykv.client  # noqa: E402


def test_lease_reads_see_every_acknowledged_commit_across_a_restart(tmp_path):
    with local_cluster(tmp_path, nodes=3, partitions=2, reads="lease") as cluster:
        assert {cluster.status(n)["reads"] for n in (1, 2, 3)} == {"lease"}
        with pykv.client.connect(cluster.addresses) as writer, \
                pykv.client.connect(cluster.addresses[2:]) as reader:
            for i in range(20):
                writer.put(f"k{i}", i)
                assert reader.get(f"k{i}") == i  # another client, right after the ack
        cluster.kill(1)
        cluster.up()
        assert cluster.status(1)["reads"] == "lease"
        with pykv.client.connect(cluster.addresses) as db:
            assert [db.get(f"k{i}") for i in range(20)] == list(range(20))
