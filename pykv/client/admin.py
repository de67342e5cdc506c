"""One-shot administrative calls to a node (status, shard map), for the CLI and tests."""

from __future__ import annotations

import asyncio
from typing import Any

from pykv.client.router import Router
from pykv.client.transport import LEAVE, META_GROUP, SHARD_MAP, STATUS, unwrap
from pykv.net.protocol import Connection


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


def fetch_statuses(addresses: list[str], timeout: float = 2.0) -> dict[str, dict | Exception]:
    """Every address's status, asked at once (so that silent nodes cost one timeout in all,
    not one each): address -> the status, or the error that came instead."""

    async def ask_all() -> list[dict | Exception]:
        return await asyncio.gather(*(_call(a, STATUS, timeout) for a in addresses), return_exceptions=True)

    return dict(zip(addresses, asyncio.run(ask_all()), strict=True))


def fetch_any_shard_map(addresses: list[str], timeout: float = 2.0) -> dict | None:
    """The shard map of the first address to answer (Router.ask_for_map: the next is asked
    as well whenever one is silent for a moment); None when none does within ``timeout``."""

    async def first() -> dict | None:
        router = Router(addresses, timeout=timeout, connect_timeout=timeout)
        try:
            shard_map, _, _ = await router.ask_for_map(addresses, asyncio.get_running_loop().time() + timeout)
            return shard_map
        finally:
            await router.close()

    return asyncio.run(first())


async def _leave(addresses: list[str], node_id: int, timeout: float) -> int:
    router = Router(addresses, timeout=timeout)
    try:
        return await router.call(META_GROUP, LEAVE, [META_GROUP, node_id])
    finally:
        await router.close()


def request_leave(addresses: list[str], node_id: int, timeout: float = 10.0) -> int:
    """Take a node out of the shard map (its shards then move away); returns the map version."""
    return asyncio.run(_leave(addresses, node_id, timeout))
