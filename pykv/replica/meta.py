"""The metadata group's state machine: the cluster's shard map, versioned and agreed through Raft.

The metadata group is a Raft group like a shard's, whose log holds shard-map changes. The
first ``replicas`` founding members found it; after that its members follow the map as a
shard's replicas do (``meta_replicas``): the metadata leader moves the group with the same
learner -> promote -> remove steps, so taking founders out never leaves it without a
quorum. A change is a compare-and-set on the version: it applies only when it is exactly
the next version, so two concurrent joins cannot both build on the same map; the loser sees
the new version and retries on top of it. Until the first change the map is the founding
map, which every node (founding or not) computes identically from its configuration
(``initial``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

from pykv.cluster.shardmap import ShardMap
from pykv.codec import pack, unpack
from pykv.replica.shard import ShardState, decode_command

SET_MAP = "m"


def meta_replicas(shard_map: ShardMap, current: Iterable[int] = ()) -> list[int]:
    """The metadata group's target members under ``shard_map``: min(replicas, nodes) nodes.

    A function of the map and the group's current members only: the current members that
    the map still names are kept (in map order), and the others are filled in map order
    (the founders first, then nodes in the order they joined). So a join never moves the
    group, and a removal swaps exactly the member that left for the oldest non-member.
    """
    count = min(shard_map.replicas, len(shard_map.nodes))
    members = set(current)
    kept = [n for n in shard_map.nodes if n in members]
    fill = [n for n in shard_map.nodes if n not in members]
    return (kept + fill)[:count]


class MetaState(ShardState):
    """A ShardState whose one extra command sets the shard map (other commands unused)."""

    def __init__(self, shard: int, resolvers: Any = None) -> None:
        super().__init__(shard, resolvers)
        self.map_bytes: bytes | None = None

    @property
    def shard_map(self) -> ShardMap | None:
        return None if self.map_bytes is None else ShardMap.decode(self.map_bytes)

    def apply(self, index: int, data: bytes) -> tuple[Any, Any]:
        cmd = decode_command(data)
        if cmd[0] != SET_MAP:
            return super().apply(index, data)
        self.applied_index = index
        proposed = ShardMap.decode(cmd[2])
        current = self.shard_map
        current_version = current.version if current is not None else 1
        if proposed.version != current_version + 1:
            return cmd[1], ["TransactionConflict", f"shard map is at version {current_version}"]
        self.map_bytes = cmd[2]
        return cmd[1], None

    def snapshot_parts(self) -> Iterator[bytes]:
        # One part: the group holds no keys, only the shard map.
        yield pack([b"".join(super().snapshot_parts()), self.map_bytes])

    def restore(self, image: bytes | BinaryIO) -> None:
        inner, self.map_bytes = unpack(image if isinstance(image, bytes) else image.read())
        super().restore(inner)
