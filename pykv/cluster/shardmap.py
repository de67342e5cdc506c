"""The versioned shard map (nodes, addresses, ring parameters) and rebalancing plans.

A :class:`ShardMap` is what every node and client agrees on to route a key: the ring
parameters and the member nodes give each partition's replica set, ``addresses`` say
where each node listens, and ``leaders`` is an optional, possibly stale hint of each
partition's current Raft leader. Maps are immutable; a change makes a new map with a
higher ``version``. :func:`next_step` gives the single-server membership change that
takes a partition's Raft group on towards its replica set, in a safe order.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from pykv.cluster.ring import HashRing, Node
from pykv.codec import pack, unpack
from pykv.errors import CorruptData, InvalidArgument

_FORMAT = 1


@dataclass(frozen=True)
class ShardMap:
    """Which nodes hold which partitions, and where the nodes listen."""

    version: int
    nodes: tuple[Node, ...]
    addresses: dict[Node, str] = field(default_factory=dict)
    partitions: int = 256
    vnodes: int = 64
    replicas: int = 3
    leaders: dict[int, Node] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.version, int) or self.version < 0:
            raise InvalidArgument(f"version must be a non-negative int, got {self.version!r}")
        # Own copies, so that a caller mutating its dicts cannot change a published map.
        object.__setattr__(self, "nodes", tuple(self.nodes))
        object.__setattr__(self, "addresses", dict(self.addresses))
        object.__setattr__(self, "leaders", dict(self.leaders))
        for node, address in self.addresses.items():
            if node not in self.nodes:
                raise InvalidArgument(f"address given for {node!r}, which is not a member")
            _check_address(address)
        for partition, node in self.leaders.items():
            if not (isinstance(partition, int) and 0 <= partition < self.partitions):
                raise InvalidArgument(
                    f"leader hint for partition {partition!r} outside 0..{self.partitions - 1}"
                )
            if node not in self.nodes:
                raise InvalidArgument(f"leader hint {node!r} for partition {partition} is not a member")
        self.ring  # noqa: B018 (builds the ring now, so bad parameters fail here)

    @cached_property
    def ring(self) -> HashRing:
        return HashRing(
            self.nodes, partitions=self.partitions, vnodes=self.vnodes, replicas=self.replicas
        )

    def partition_of(self, key: bytes | str) -> int:
        return self.ring.partition_of(key)

    def replicas_of(self, partition: int) -> tuple[Node, ...]:
        return self.ring.replicas(partition)

    def owners(self, key: bytes | str) -> tuple[Node, ...]:
        return self.ring.owners(key)

    def leader_hint(self, partition: int) -> Node:
        """The hinted leader of a partition, else its preferred (first) replica."""
        return self.leaders.get(partition, self.ring.replicas(partition)[0])

    def address_of(self, node: Node) -> str:
        try:
            return self.addresses[node]
        except KeyError:
            raise InvalidArgument(f"no address known for node {node!r}") from None

    # --- changes: each makes the next version -----------------------------------------

    def with_node(self, node: Node, address: str | None = None) -> ShardMap:
        if node in self.nodes:
            raise InvalidArgument(f"node {node!r} is already a member")
        addresses = dict(self.addresses)
        if address is not None:
            addresses[node] = address
        return self._next(nodes=self.nodes + (node,), addresses=addresses)

    def without_node(self, node: Node) -> ShardMap:
        if node not in self.nodes:
            raise InvalidArgument(f"node {node!r} is not a member")
        return self._next(
            nodes=tuple(n for n in self.nodes if n != node),
            addresses={n: a for n, a in self.addresses.items() if n != node},
            leaders={p: n for p, n in self.leaders.items() if n != node},
        )

    def with_leader(self, partition: int, node: Node) -> ShardMap:
        """Record a leader hint; hints do not change placement, so the version stays."""
        return replace(self, leaders={**self.leaders, partition: node})

    def _next(self, **changes: Any) -> ShardMap:
        return replace(self, version=self.version + 1, **changes)

    # --- encoding ----------------------------------------------------------------------

    def encode(self) -> bytes:
        """Bytes for the wire or the disk (msgpack via pykv.codec)."""
        return pack(
            {
                "format": _FORMAT,
                "version": self.version,
                "nodes": list(self.nodes),
                "addresses": [[n, a] for n, a in self.addresses.items()],
                "partitions": self.partitions,
                "vnodes": self.vnodes,
                "replicas": self.replicas,
                "leaders": [[p, n] for p, n in sorted(self.leaders.items())],
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> ShardMap:
        """Inverse of encode(); raises CorruptData on anything it did not produce."""
        raw = unpack(data)
        try:
            if raw["format"] != _FORMAT:
                raise CorruptData(f"shard map format {raw['format']!r}, expected {_FORMAT}")
            return cls(
                version=raw["version"],
                nodes=tuple(raw["nodes"]),
                addresses={n: a for n, a in raw["addresses"]},
                partitions=raw["partitions"],
                vnodes=raw["vnodes"],
                replicas=raw["replicas"],
                leaders={p: n for p, n in raw["leaders"]},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptData(f"malformed shard map: {exc}") from exc


def _check_address(address: object) -> None:
    if not isinstance(address, str):
        raise InvalidArgument(f"addresses are 'host:port' strings, got {address!r}")
    host, sep, port = address.rpartition(":")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise InvalidArgument(f"address {address!r} is not 'host:port'")


# --- rebalancing ---------------------------------------------------------------------------


class StepKind(enum.Enum):
    """One single-server membership change of a partition's Raft group (its value names it
    in a CONF request)."""

    ADD_LEARNER = "add_learner"  # joins, receives the log/snapshot, does not vote
    PROMOTE = "promote"  # a caught-up learner becomes a voter
    TRANSFER_LEADER = "transfer"  # hand leadership away before the leader leaves
    REMOVE = "remove"  # a voter leaves the group


@dataclass(frozen=True)
class Step:
    kind: StepKind
    node: Node


def next_step(
    voters: Iterable[Node], learners: Iterable[Node], leader: Node | None, target: Iterable[Node],
) -> Step | None:
    """The next single-server membership change that takes a group towards ``target``
    (None once its members are exactly ``target``, all voting).

    Each incoming node is added as a learner and promoted once caught up (the leader refuses
    before) ahead of any removal, so the group never has fewer voters than the smaller of
    its old and new sizes; a learner the target no longer names is removed unpromoted; the
    leader leaves last, after handing leadership to a target voter. Used by the metadata
    leader on every group (pykv.server.node) and by the transaction simulator's moves.
    """
    voters, learners, target = set(voters), set(learners), list(target)
    missing = [n for n in target if n not in voters | learners]
    if missing:
        return Step(StepKind.ADD_LEARNER, missing[0])
    promote = sorted(learners & set(target))
    if promote:
        return Step(StepKind.PROMOTE, promote[0])
    extra = sorted((voters | learners) - set(target), key=lambda n: (n == leader, n))
    if not extra:
        return None
    if extra[0] == leader:
        return Step(StepKind.TRANSFER_LEADER, target[0])
    return Step(StepKind.REMOVE, extra[0])
