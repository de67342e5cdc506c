"""A cluster backup (db.backup), and a consistent scan read past its budget, while the node
holding a shard's export is SIGKILLed or SIGSTOPped: real processes. The backup begins again,
and its copy is whole and of one moment; the scan, which handed out items already, fails
its reader with TransactionConflict, and a scan taken again is whole. A restore while a
shard leader is SIGKILLed or SIGSTOPped loads every version, clocks kept."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster_harness import local_cluster  # noqa: E402
from transfers import Transfers  # noqa: E402

import pykv  # noqa: E402
from pykv.server.cmd_restore import restore  # noqa: E402

pytestmark = pytest.mark.slow

VALUE = b"v" * 10_000  # about 3 pages (1 MiB each) per shard: the backup reads in rounds


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_a_backup_survives_the_loss_of_a_node_holding_an_export(tmp_path, fault):
    with local_cluster(tmp_path, nodes=3, partitions=8) as cluster:
        accounts = [f"acct{i:02d}" for i in range(24)]
        with pykv.connect(cluster.addresses, timeout=3) as db:
            _load(db, accounts)
            core = db.backend.core
            send_round = core.round
            hit: list[int] = []

            async def pages_then_fault(sends):
                if not hit:  # the first round of pages: take away a node that holds an export
                    hit.append(sends[0].node)
                    cluster.signal(hit[0], getattr(signal, fault))
                return await send_round(sends)

            core.round = pages_then_fault
            try:
                with pykv.connect(cluster.addresses) as movers, Transfers(movers, accounts) as moving:
                    db.backup(tmp_path / "copy")  # its client gives up on a silent node after 3 s
            finally:
                if fault == "SIGSTOP":
                    cluster.signal(hit[0], signal.SIGCONT)
            assert moving.errors == []
            assert core.rounds["export"] >= 2  # begun again once the node was lost
        with pykv.open(tmp_path / "copy") as backup:
            assert sum(backup.get(account) for account in accounts) == 100 * len(accounts)
            assert backup.get_many([f"blob{i:05d}" for i in range(2_400)]) == {
                f"blob{i:05d}": VALUE for i in range(2_400)
            }
        assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_a_streamed_scan_whose_export_is_lost_fails_its_reader_and_a_new_one_is_whole(tmp_path):
    with local_cluster(tmp_path, nodes=3, partitions=8) as cluster:
        accounts = [f"acct{i:02d}" for i in range(24)]
        with pykv.connect(cluster.addresses, timeout=3, max_scan_bytes=1 << 20) as db:
            _load(db, accounts)
            core = db.backend.core
            step = core.export_step
            killed: list[int] = []

            async def kill_then_step(rest):
                if not killed:  # the caller has items already: the rest of an export is lost
                    killed.append(rest.sends()[0].node)
                    cluster.signal(killed[0], signal.SIGKILL)
                return await step(rest)

            core.export_step = kill_then_step
            scan = db.scan("blob")
            assert next(scan) == ("blob00000", VALUE)
            with pytest.raises(pykv.TransactionConflict, match="did not answer"):
                for _ in scan:
                    pass
            assert killed
            core.export_step = step
            assert [k for k, _ in db.scan("blob")] == [f"blob{i:05d}" for i in range(2_400)]


def _load(db, accounts: list[str]) -> None:
    """100 in each account, and 2,400 blobs of VALUE (24 MB: 3 pages of each shard)."""
    with db.transaction() as tx:
        for account in accounts:
            tx.put(account, 100)
    for start in range(0, 2_400, 200):
        with db.transaction() as tx:
            for i in range(start, start + 200):
                tx.put(f"blob{i:05d}", VALUE)


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_a_restore_survives_the_loss_of_a_shard_leader(tmp_path, fault):
    """pykv restore's loads go on while the leader of shard 0 is SIGKILLed or SIGSTOPped
    after the first batch: the router sends them to the new leaders, a load that may have
    applied is sent again (loading what a key holds already changes nothing), and the
    cluster ends with every version of the backup, its clock and timestamp kept."""
    source = tmp_path / "source"
    with pykv.open(source) as db:
        for start in range(0, 6_000, 1_000):
            with db.transaction() as tx:
                for i in range(start, start + 1_000):
                    tx.put(f"rs{i:05d}", f"value {i} " * 20)
        expected = dict(db.backend.scan("", None, None, None))
    with local_cluster(tmp_path / "cluster", nodes=3, partitions=8) as cluster:
        with pykv.open(source, read_only=True) as backup, pykv.connect(cluster.addresses) as db:
            load = db.backend.load
            batches: list[int] = []
            victim: list[int] = []

            def load_then_fault(batch):
                batches.append(len(batch))
                if len(batches) == 2:  # every later wave of 4 batches has keys of shard 0
                    victim.append(cluster.leader_of(0))
                    cluster.signal(victim[0], getattr(signal, fault))
                return load(batch)

            db.backend.load = load_then_fault
            try:
                assert restore(backup, db) == len(expected)
            finally:
                if fault == "SIGSTOP":
                    cluster.signal(victim[0], signal.SIGCONT)
            assert len(batches) == 12
            if fault == "SIGSTOP":  # the loads waited on it, then went to the new leader
                assert db.backend.core.router.timeouts[victim[0]] >= 1
            else:
                assert victim[0] not in cluster.alive()
            assert dict(db.backend.scan("", None, None, None)) == expected
