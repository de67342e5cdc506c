"""Which cluster and which node a node's data directory belongs to (the file DIR/IDENTITY).

A node names its cluster id in the HELLO of every connection it makes, and refuses a
connection that names another (see pykv.net.protocol), so a node started with a wrong
``--peers`` or on a port another cluster reused cannot vote in, lead or overwrite that
cluster's groups. Its data directory records the
cluster and the node id it was first started with, so a directory started again as another
node, or under another cluster, is refused before it joins anything: a Raft log replayed as
another member's would make that member vote twice in a term.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import xxhash

from pykv.errors import CorruptData, InvalidArgument, WrongCluster
from pykv.storage.files import replace_atomically

IDENTITY_FILE = "IDENTITY"
_CLUSTER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_cluster_id(text: str) -> str:
    """``text`` if it can name a cluster (1-64 letters, digits, ``.``, ``_``, ``-``, starting
    with a letter or digit), else InvalidArgument."""
    if not isinstance(text, str) or not _CLUSTER_ID.fullmatch(text):
        raise InvalidArgument(
            f"a cluster id is 1-64 letters, digits, '.', '_' or '-' (starting with a letter or "
            f"digit), not {text!r:.80}"
        )
    return text


def new_cluster_id() -> str:
    """A fresh random cluster id (64 bits, in hex)."""
    return secrets.token_hex(8)


def founders_cluster_id(founders: dict[int, str]) -> str:
    """The cluster id that nodes started by hand without ``--cluster-id`` agree on: derived
    from the founding members and their addresses, which they are all given alike."""
    text = ",".join(f"{node}={address}" for node, address in sorted(founders.items()))
    return xxhash.xxh64_hexdigest(text.encode())


@dataclass(frozen=True)
class Identity:
    """What a node's data directory records of the cluster and the node it belongs to."""

    cluster: str
    node: int
    partitions: int | None = None  # fixed for the life of the cluster

    def to_json(self) -> bytes:
        return json.dumps({"cluster": self.cluster, "node": self.node,
                           "partitions": self.partitions}).encode() + b"\n"


def read_identity(data_dir: Path) -> Identity | None:
    """What ``data_dir`` records, or None for a directory that has nothing recorded (new, or
    written by a release before identities). CorruptData for an unreadable file."""
    path = data_dir / IDENTITY_FILE
    try:
        raw = json.loads(path.read_bytes())
        identity = Identity(raw["cluster"], raw["node"], raw.get("partitions"))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CorruptData(f"{path} does not hold a cluster and a node id: {exc}") from None
    if not (isinstance(identity.cluster, str) and isinstance(identity.node, int)
            and isinstance(identity.partitions, int | None)):
        raise CorruptData(f"{path} does not hold a cluster and a node id: {raw!r:.80}")
    return identity


def claim_identity(data_dir: Path, node_id: int, cluster_id: str | None, founders: dict[int, str],
                   partitions: int) -> str:
    """The id of the cluster this node serves, recorded in ``data_dir`` on its first start.

    ``cluster_id``: the one the node was started with (None: the directory's, or else the
    founders'). WrongCluster if the directory belongs to another cluster, InvalidArgument if
    it holds another node's data or the cluster has another number of partitions (each
    replica's state machine depends on it: replicas given different ones would diverge).
    """
    recorded = read_identity(data_dir)
    if recorded is None:
        cluster = cluster_id if cluster_id is not None else founders_cluster_id(founders)
        identity = Identity(cluster, node_id, partitions)
        replace_atomically(os.fspath(data_dir / IDENTITY_FILE), identity.to_json())
        return cluster
    cluster, node = recorded.cluster, recorded.node
    if node != node_id:
        raise InvalidArgument(
            f"{data_dir} holds the data of node {node}, not of node {node_id}: start it as "
            f"--id {node}, or give node {node_id} a directory of its own"
        )
    if cluster_id is not None and cluster_id != cluster:
        raise WrongCluster(
            f"{data_dir} belongs to cluster {cluster!r}, not to cluster {cluster_id!r} "
            f"(--cluster-id): it is another cluster's node"
        )
    if recorded.partitions is not None and recorded.partitions != partitions:
        raise InvalidArgument(
            f"{data_dir} belongs to a cluster whose partitions are fixed at "
            f"{recorded.partitions} for its life, not {partitions} (--partitions)"
        )
    return cluster
