"""The versioned shard map (nodes, addresses, ring parameters) and rebalancing plans.

A :class:`ShardMap` is what every node and client agrees on to route a key: the ring
parameters and the member nodes give each partition's replica set, ``addresses`` say
where each node listens, and ``leaders`` is an optional, possibly stale hint of each
partition's current Raft leader. Maps are immutable; a change makes a new map with a
higher ``version``. :func:`plan_rebalance` turns two maps into the single-server
membership changes each partition's Raft group must make, in a safe order.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from pykv.cluster.ring import HashRing, Node, node_token
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
    """One single-server membership change of a partition's Raft group."""

    ADD_LEARNER = "add_learner"  # joins, receives the log/snapshot, does not vote
    PROMOTE = "promote"  # a caught-up learner becomes a voter
    TRANSFER_LEADER = "transfer_leader"  # hand leadership away before the leader leaves
    REMOVE = "remove"  # a voter leaves the group


@dataclass(frozen=True)
class Step:
    kind: StepKind
    node: Node


@dataclass(frozen=True)
class Move:
    """How one partition's replica set goes from ``old`` to ``new``, one server at a time."""

    partition: int
    old: tuple[Node, ...]
    new: tuple[Node, ...]
    add: tuple[Node, ...]
    remove: tuple[Node, ...]
    steps: tuple[Step, ...]


def plan_rebalance(old: ShardMap, new: ShardMap) -> list[Move]:
    """The membership changes that take every partition from old's replicas to new's.

    Per partition, each incoming node is added as a learner and promoted once caught up
    before an outgoing voter is removed, so the group never has fewer voters than the
    smaller of its old and new sizes; the current leader (hinted, or the preferred
    replica) leaves last, after a leadership transfer to a node that stays.
    """
    if new.partitions != old.partitions:
        raise InvalidArgument(
            f"cannot rebalance between {old.partitions} and {new.partitions} partitions"
        )
    if new.version <= old.version:
        raise InvalidArgument(f"new map version {new.version} is not after {old.version}")
    moves = []
    for partition in range(old.partitions):
        before, after = old.replicas_of(partition), new.replicas_of(partition)
        if set(before) == set(after):
            continue
        add = tuple(n for n in after if n not in before)
        leader = old.leader_hint(partition)
        leaving = sorted((n for n in before if n not in after), key=node_token)
        remove = tuple(n for n in leaving if n != leader) + tuple(n for n in leaving if n == leader)
        moves.append(
            Move(partition, before, after, add, remove, _steps(add, remove, leader, after))
        )
    return moves


def _steps(
    add: tuple[Node, ...], remove: tuple[Node, ...], leader: Node, after: tuple[Node, ...]
) -> tuple[Step, ...]:
    steps: list[Step] = []
    for i in range(max(len(add), len(remove))):
        if i < len(add):
            steps += [Step(StepKind.ADD_LEARNER, add[i]), Step(StepKind.PROMOTE, add[i])]
        if i < len(remove):
            if remove[i] == leader:
                steps.append(Step(StepKind.TRANSFER_LEADER, after[0]))
            steps.append(Step(StepKind.REMOVE, remove[i]))
    return tuple(steps)
