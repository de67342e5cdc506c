"""The RPC kinds nodes speak over a pykv.net Connection, and their tagged replies.

A request is a frame of one of the kinds below (pykv.net.framing); request id 0 is a
one-way message (no response), which is how nodes ship Raft message batches to each other.

Replies (the body of a RESPONSE frame) are tagged lists:
``[OK, result]``, ``[REDIRECT, leader_hint]`` (this node does not lead the shard; the hint
is a node id or None), ``[FAILED, error_class_name, message]`` (a pykv error to raise).
"""

from __future__ import annotations

from typing import Any

from pykv import errors
from pykv.errors import ProtocolError

# Application frame kinds (pykv.net.framing reserves 0-15).
RAFT = 16  # one-way: a batch of Raft messages for many groups, from one node to another
STATUS = 17  # node and group status (pykv status, cluster up)
SHARD_MAP = 18  # the shard map: ring parameters, replica sets, addresses, leader hints
READ = 19  # [shard, [keys], optimistic?, clocks only?] -> [version wire per key]  (linearizable,
# on the leader; optimistic: answered from the leader's state without a leadership round;
# clocks only: each version without its value, for a read-only commit's confirmation)
COMMIT = 20  # [shard, request wire] -> outcome  (a single-shard transaction)
PREPARE = 21  # [shard, request wire, coordinator shard, participants] -> vote outcome
DECIDE = 22  # [shard, txid, commit?, participants] -> the recorded decision (bool)
FINISH = 23  # [shard, txid, commit?] -> outcome
SCAN = 24  # [shard, prefix, start, end, limit(, deleted, page bytes)] -> [[key, version wire]...];
# with page bytes, one page of about that many bytes: [[[key, version wire]...], next start]
# (None when the range ends there), so that no reply grows with the range
RESOLVER = 25  # [shard, prefix, builtin name] -> outcome
COMMIT_DECIDE = 26  # [shard, request wire, other shards?] -> outcome: the coordinator's part +
# decision; with the other participants' shards, the leader then sends them FINISH
JOIN = 27  # [META_GROUP, node id, address] -> map version: add a node to the shard map
MEMBERS = 28  # [shard] -> {leader, voters, learners, commit, match} from the shard's leader
CONF = 29  # [shard, step, node] -> None: add_learner / promote / remove / transfer
HOST = 30  # [shard] -> None: start hosting an empty replica (a learner-to-be)
DROP = 31  # [shard] -> None: stop hosting a replica this node was removed from
WIPE = 32  # [shard] -> outcome: forget every key, resolver and outcome of the shard
LEAVE = 33  # [META_GROUP, node id] -> map version: take a node out of the shard map
PING = 34  # None -> None: the node's loop is alive (the metadata leader's liveness probe)
SNAPSHOT_CHUNK = 35  # one-way: a piece of an InstallSnapshot image (pykv.server.snapshots)
EXPORT = 36  # [shard, export id, "begin", prefix, start, end | "next", page number | "end"] ->
# [node id, [[key, version wire]...], more?]: a reader's view of the live keys of a range (all:
# a backup's) from the moment it began, a page at a time ("begin" goes to the leader,
# linearizable, and answers no keys, with the shard's resolvers {prefix: name} as a fourth
# item; the rest to the node that answered it; the last page served is answered again when
# asked again)
LOAD = 37  # [shard, [key update wire...]] -> outcome: store versions made elsewhere, clocks and
# timestamps kept (pykv restore); a key the shard holds a version of gets a clock after both
RESOLVERS = 38  # [shard] -> {prefix: built-in name}: the resolvers registered on the shard

META_GROUP = 1 << 20  # the Raft group id of the metadata group (shard groups are 0..Q-1)

OK, REDIRECT, FAILED = 0, 1, 2


class Redirect(Exception):
    """The node does not lead the shard; ``leader`` is its hint (a node id or None)."""

    def __init__(self, leader: int | None) -> None:
        super().__init__(f"not the leader; hint: {leader}")
        self.leader = leader


def unwrap(reply: Any) -> Any:
    """The result of a tagged reply; raises Redirect or the pykv error it names."""
    if not isinstance(reply, list) or not reply:
        raise ProtocolError(f"malformed reply {reply!r:.80}")
    tag = reply[0]
    if tag == OK:
        return reply[1]
    if tag == REDIRECT:
        raise Redirect(reply[1])
    if tag == FAILED:
        raise errors.by_name(reply[1], reply[2])
    raise ProtocolError(f"unknown reply tag {tag!r}")


__all__ = [
    "COMMIT", "COMMIT_DECIDE", "CONF", "DROP", "HOST", "JOIN",
    "LEAVE", "LOAD", "MEMBERS", "META_GROUP", "WIPE", "DECIDE", "FAILED", "FINISH", "OK", "PING", "PREPARE", "RAFT", "READ",
    "REDIRECT", "RESOLVER", "RESOLVERS", "Redirect", "SCAN", "SHARD_MAP", "SNAPSHOT_CHUNK", "STATUS",
    "unwrap",
]
