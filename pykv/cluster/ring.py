"""The consistent-hash ring: keys to Q equal partitions, partitions to replica sets of nodes.

DESIGN §4. The 64-bit key space (xxhash64 of the key) is cut into ``partitions`` equal
ranges; a partition is a shard. Each node owns ``vnodes`` points on the same 64-bit ring
(xxhash64 of the node id and the point number), and a partition's replica set is the
first ``replicas`` distinct nodes met walking clockwise from the partition's start. The
first replica is the preferred leader.

Because a node's points do not depend on the other nodes, adding a node only inserts it
into the replica sets of the partitions whose walk now meets it first (about R/(N+1) of
them, each losing one replica); removing a node only touches the partitions it was in.
The ring is immutable and pure: no I/O, no clock, no randomness.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

import xxhash

from pykv.errors import InvalidArgument

Node = int | str

_RING = 1 << 64


def node_token(node: Node) -> bytes:
    """The canonical bytes of a node id, so that 7 and "7" are different nodes."""
    if isinstance(node, bool) or not isinstance(node, (int, str)):
        raise InvalidArgument(f"node ids are int or str, not {type(node).__name__}: {node!r}")
    if isinstance(node, int):
        return b"i:" + str(node).encode()
    return b"s:" + node.encode("utf-8")


def key_hash(key: bytes | str) -> int:
    """The stable 64-bit hash of a key (xxhash64, seed 0); str keys hash as UTF-8."""
    if isinstance(key, str):
        key = key.encode("utf-8")
    return xxhash.xxh64_intdigest(key)


class HashRing:
    """An immutable ring of nodes over ``partitions`` equal partitions.

    >>> ring = HashRing([1, 2, 3, 4], partitions=64, vnodes=16, replicas=3)
    >>> len(ring.owners(b"user:42"))
    3
    """

    def __init__(
        self,
        nodes: Iterable[Node],
        *,
        partitions: int = 256,
        vnodes: int = 64,
        replicas: int = 3,
    ) -> None:
        node_list = list(nodes)
        for name, value in (("partitions", partitions), ("vnodes", vnodes), ("replicas", replicas)):
            if not isinstance(value, int) or value < 1:
                raise InvalidArgument(f"{name} must be a positive int, got {value!r}")
        if not node_list:
            raise InvalidArgument("a ring needs at least one node")
        tokens = [node_token(n) for n in node_list]
        if len(set(tokens)) != len(tokens):
            raise InvalidArgument(f"duplicate node ids in {node_list!r}")
        self.partitions = partitions
        self.vnodes = vnodes
        self.replication = replicas
        # Sorted by token so that every ordering of the same nodes builds the same ring.
        self.nodes: tuple[Node, ...] = tuple(
            n for _, n in sorted(zip(tokens, node_list, strict=True))
        )
        points = sorted(
            (xxhash.xxh64_intdigest(token + b"#" + str(v).encode()), token, node)
            for token, node in zip(tokens, node_list, strict=True)
            for v in range(vnodes)
        )
        self._point_hashes = [h for h, _, _ in points]
        self._point_nodes = [n for _, _, n in points]
        self._table = tuple(self._walk(self.partition_start(p)) for p in range(partitions))

    def _walk(self, position: int) -> tuple[Node, ...]:
        """The first R distinct nodes at or clockwise after position."""
        want = min(self.replication, len(self.nodes))
        found: list[Node] = []
        i = bisect.bisect_left(self._point_hashes, position)
        count = len(self._point_nodes)
        while len(found) < want:
            node = self._point_nodes[i % count]
            if node not in found:
                found.append(node)
            i += 1
        return tuple(found)

    def partition_start(self, partition: int) -> int:
        """The first 64-bit hash of the partition's range (its position on the ring)."""
        return -((-partition * _RING) // self.partitions)  # ceil(p * 2^64 / Q)

    def partition_of(self, key: bytes | str) -> int:
        """The partition (shard) that holds a key."""
        return (key_hash(key) * self.partitions) >> 64

    def replicas(self, partition: int) -> tuple[Node, ...]:
        """The partition's replica set, clockwise order; the first is the preferred leader."""
        if not 0 <= partition < self.partitions:
            raise InvalidArgument(f"partition {partition} is outside 0..{self.partitions - 1}")
        return self._table[partition]

    def owners(self, key: bytes | str) -> tuple[Node, ...]:
        """The replica set of the partition that holds a key."""
        return self._table[self.partition_of(key)]

    def with_node(self, node: Node) -> HashRing:
        """The same ring with one more node."""
        if node in self.nodes:
            raise InvalidArgument(f"node {node!r} is already on the ring")
        return self._rebuilt(self.nodes + (node,))

    def without_node(self, node: Node) -> HashRing:
        """The same ring without a node (at least one node must remain)."""
        if node not in self.nodes:
            raise InvalidArgument(f"node {node!r} is not on the ring")
        return self._rebuilt(tuple(n for n in self.nodes if n != node))

    def _rebuilt(self, nodes: tuple[Node, ...]) -> HashRing:
        return HashRing(
            nodes, partitions=self.partitions, vnodes=self.vnodes, replicas=self.replication
        )

    def moved_partitions(self, other: HashRing) -> set[int]:
        """Partitions whose replica set (as a set) differs between the two rings."""
        if other.partitions != self.partitions:
            raise InvalidArgument(
                f"rings with {self.partitions} and {other.partitions} partitions do not compare"
            )
        return {
            p
            for p, (mine, theirs) in enumerate(zip(self._table, other._table, strict=True))
            if set(mine) != set(theirs)
        }

    def load(self) -> dict[Node, int]:
        """How many replica slots each node holds (every partition counts R slots)."""
        counts = dict.fromkeys(self.nodes, 0)
        for replica_set in self._table:
            for node in replica_set:
                counts[node] += 1
        return counts

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HashRing):
            return NotImplemented
        return (self.nodes, self.partitions, self.vnodes, self.replication) == (
            other.nodes,
            other.partitions,
            other.vnodes,
            other.replication,
        )

    def __hash__(self) -> int:
        return hash((self.nodes, self.partitions, self.vnodes, self.replication))

    def __repr__(self) -> str:
        return (
            f"HashRing(nodes={list(self.nodes)!r}, partitions={self.partitions}, "
            f"vnodes={self.vnodes}, replicas={self.replication})"
        )
