"""Node-local durable state over the engine: value logs, key directory, snapshots, compaction."""

from pykv.storage.compaction import CompactionStats
from pykv.storage.store import ABSENT, Storage, StoredVersion, Update

__all__ = ["ABSENT", "CompactionStats", "Storage", "StoredVersion", "Update"]
