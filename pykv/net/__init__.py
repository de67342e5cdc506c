"""Networking: sans-I/O framing, the uvloop protocol and the peer pool."""

from pykv.net.framing import FIRST_APP_KIND, PROTOCOL_VERSION, Frame, FrameDecoder, encode_frame
from pykv.net.protocol import Connection, PeerPool, Server, new_event_loop, serve

__all__ = [
    "FIRST_APP_KIND",
    "PROTOCOL_VERSION",
    "Connection",
    "Frame",
    "FrameDecoder",
    "PeerPool",
    "Server",
    "encode_frame",
    "new_event_loop",
    "serve",
]
