"""Networking: sans-I/O framing and the framed asyncio connection clients and nodes share."""

from pykv.net.framing import FIRST_APP_KIND, PROTOCOL_VERSION, Frame, FrameDecoder, encode_frame
from pykv.net.protocol import (
    Connection,
    FramedProtocol,
    ServerProtocol,
    new_event_loop,
    parse_address,
)

__all__ = [
    "FIRST_APP_KIND",
    "PROTOCOL_VERSION",
    "Connection",
    "Frame",
    "FrameDecoder",
    "FramedProtocol",
    "ServerProtocol",
    "encode_frame",
    "new_event_loop",
    "parse_address",
]
