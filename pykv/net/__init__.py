"""Networking: sans-I/O framing, the uvloop protocol and the peer pool."""
