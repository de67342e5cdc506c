"""Sync and asyncio clients for a cluster: routing, redirects and retries."""
