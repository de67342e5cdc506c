"""Sync and asyncio clients for a cluster: routing, redirects and retries."""

from __future__ import annotations

from pykv.api import KeyValueStore
from pykv.client.cluster import AsyncCluster, ClusterBackend
from pykv.client.router import seed_addresses
from pykv.types import MAX_SCAN_BYTES, MAX_TXN_BYTES, MAX_TXN_OPS, MAX_VALUE_BYTES


def connect(
    addresses: list[str] | str,
    *,
    timeout: float = 10.0,
    max_txn_ops: int = MAX_TXN_OPS,
    max_value_bytes: int = MAX_VALUE_BYTES,
    max_scan_bytes: int = MAX_SCAN_BYTES,
    max_txn_bytes: int = MAX_TXN_BYTES,
) -> KeyValueStore:
    """Connect to a cluster through any subset of its node addresses ("HOST:PORT").

    The client learns the shard map from the first node that answers, then routes every
    request to its shard's leader. ``timeout`` bounds each operation, retries included:
    past it the call raises Timeout (outcome unknown) or Unavailable (no node reachable).
    The limits are those of pykv.open.
    """
    backend = ClusterBackend(seed_addresses(addresses), timeout=timeout)
    try:
        return KeyValueStore(backend, max_txn_ops=max_txn_ops, max_value_bytes=max_value_bytes,
                             max_scan_bytes=max_scan_bytes, max_txn_bytes=max_txn_bytes)
    except BaseException:
        backend.close()
        raise


__all__ = ["AsyncCluster", "ClusterBackend", "connect"]
