"""Node-local durable state over the engine: value logs, key directory, snapshots, compaction."""
