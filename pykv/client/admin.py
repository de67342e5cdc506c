"""One-shot administrative calls to a node (status, shard map), for the CLI and tests."""

from __future__ import annotations

import asyncio
from typing import Any

from pykv.client.transport import SHARD_MAP, STATUS, Connection, unwrap


async def _call(address: str, kind: int, timeout: float) -> Any:
    conn = await Connection.open(address, timeout=timeout)
    try:
        return unwrap(await conn.request(kind, None, timeout))
    finally:
        conn.close()


def fetch_status(address: str, timeout: float = 2.0) -> dict:
    """The node's status: id, address, pid and per group leader/term/commit/applied/lag."""
    return asyncio.run(_call(address, STATUS, timeout))


def fetch_shard_map(address: str, timeout: float = 2.0) -> dict:
    return asyncio.run(_call(address, SHARD_MAP, timeout))
