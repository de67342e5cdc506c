"""Node.handle answers every request kind through its respond callback, exactly once: the
error replies too (a redirect from a follower, Unavailable for a shard it does not host).

One real node of a three-node cluster runs in-process, alone: it hosts every shard and the
metadata group but can lead none, so each request to a hosted group is refused with
[REDIRECT, None].
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster_harness import free_port_range  # noqa: E402

from pykv.client.transport import (  # noqa: E402
    COMMIT,
    COMMIT_DECIDE,
    CONF,
    DECIDE,
    FAILED,
    FINISH,
    HOST,
    JOIN,
    LEAVE,
    LOAD,
    MEMBERS,
    META_GROUP,
    OK,
    PING,
    PREPARE,
    READ,
    REDIRECT,
    RESOLVER,
    RESOLVERS,
    SCAN,
    WIPE,
)
from pykv.server.node import Node, NodeConfig  # noqa: E402
from pykv.txn.model import CommitRequest, WriteOp  # noqa: E402
from pykv.types import OpKind  # noqa: E402

UNKNOWN = 99  # a shard the node does not host (the cluster has 2)


def _request() -> dict:
    return CommitRequest(1, 0, {}, (WriteOp("k", OpKind.PUT, 1, None),)).to_wire()


def _shard_requests(shard: int) -> dict[str, tuple[int, list]]:
    """A well-formed request of every kind that needs group ``shard``'s leader."""
    return {
        "READ": (READ, [shard, ["k"]]),
        "READ optimistic": (READ, [shard, ["k"], True]),
        "READ clocks only": (READ, [shard, ["k"], False, True]),
        "COMMIT": (COMMIT, [shard, _request()]),
        "COMMIT_DECIDE": (COMMIT_DECIDE, [shard, _request(), [1]]),
        "PREPARE": (PREPARE, [shard, _request(), 0, [0, 1]]),
        "DECIDE": (DECIDE, [shard, 1, False]),
        "FINISH": (FINISH, [shard, 1, True]),
        "SCAN": (SCAN, [shard, "", None, None, None]),
        "MEMBERS": (MEMBERS, [shard]),
        "CONF": (CONF, [shard, "promote", 2]),
        "RESOLVER": (RESOLVER, [shard, "r", None]),
        "RESOLVERS": (RESOLVERS, [shard]),
        "WIPE": (WIPE, [shard]),
        "LOAD": (LOAD, [shard, [["k", b"", 1, 1]]]),
    }


def _serve(node: Node, kind: int, body: list) -> list:
    """The replies ``respond`` was given; handle itself returns nothing."""
    replies: list = []
    assert node.handle(kind, body, replies.append) is None
    return replies


async def _replies(tmp_path: Path) -> dict[str, list]:
    base = free_port_range(3)
    peers = {n: f"127.0.0.1:{base + n - 1}" for n in (1, 2, 3)}
    node = Node(NodeConfig(node_id=1, listen=peers[1], peers=peers, data_dir=tmp_path,
                           partitions=2, state="memory", dead_after=0))
    await node.start()
    try:
        got = {f"{name} to a follower": _serve(node, *req) for name, req in _shard_requests(0).items()}
        got |= {f"{name} to a stranger": _serve(node, *req)
                for name, req in _shard_requests(UNKNOWN).items()}
        got["JOIN"] = _serve(node, JOIN, [META_GROUP, 4, "127.0.0.1:1"])
        got["LEAVE"] = _serve(node, LEAVE, [META_GROUP, 2])
        got["LEAVE of a non-member"] = _serve(node, LEAVE, [META_GROUP, 7])
        got["PING"] = _serve(node, PING, None)
        got["HOST"] = _serve(node, HOST, [0])
        got["unknown kind"] = _serve(node, 63, [0])
        got["no shard"] = _serve(node, READ, None)
        got["malformed COMMIT"] = _serve(node, COMMIT, [0, "junk"])
        got["malformed LOAD"] = _serve(node, LOAD, [0, [["k"]]])
        got["LOAD of no list"] = _serve(node, LOAD, [0, 7])
        got["LOAD of a key too long"] = _serve(node, LOAD, [0, [["k" * 257, b"", 1, 1]]])
        got["LOAD of a value too large"] = _serve(node, LOAD, [0, [["k", b"", 1, b"v" * (2 << 20)]]])
        # Only COMMIT_DECIDE may record a commit (it names the participants to wait for).
        got["DECIDE commit"] = _serve(node, DECIDE, [0, 1, True])
        return got
    finally:
        await node.stop()


def test_every_request_kind_is_answered_through_respond_exactly_once(tmp_path):
    got = asyncio.run(_replies(tmp_path))
    for name in _shard_requests(0):
        assert got[f"{name} to a follower"] == [[REDIRECT, None]], name
        (reply,) = got[f"{name} to a stranger"]
        assert reply[:2] == [FAILED, "Unavailable"] and str(UNKNOWN) in reply[2], name
    assert got["JOIN"] == got["LEAVE"] == [[REDIRECT, None]]  # metadata proposals
    assert got["LEAVE of a non-member"] == [[OK, 1]]  # nothing to do: the map's version
    assert got["PING"] == got["HOST"] == [[OK, None]]
    assert got["LOAD of a key too long"][0][:2] == [FAILED, "KeyTooLarge"]
    assert got["LOAD of a value too large"][0][:2] == [FAILED, "ValueTooLarge"]
    for name in ("unknown kind", "no shard", "malformed COMMIT", "malformed LOAD", "LOAD of no list", "DECIDE commit"):
        (reply,) = got[name]
        assert reply[:2] == [FAILED, "ProtocolError"], name
