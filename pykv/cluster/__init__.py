"""Placement: the hash ring, the shard map and rebalancing decisions."""
