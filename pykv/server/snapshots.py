"""InstallSnapshot over the wire in chunks, so that a shard's image may be larger than a frame.

Raft hands the node a SNAP message carrying a handle to the image (pykv.replica.durable).
Rather than one frame holding the whole image (refused beyond ``max_frame``, and blocking
every other group's traffic on that connection while it travels), ``SnapshotSender``
streams the image to the follower's node as SNAPSHOT_CHUNK frames of at most ``chunk_bytes``,
read from a file (the snapshot's own, or one the shard's image is written into as it is
made), waiting for the connection to drain between two, and the last chunk carries the
Raft message itself. ``SnapshotReceiver`` writes the chunks into a file and steps that
message, holding a handle to the file, once the whole image has arrived; the node then
persists and restores the image from the file a piece at a time, so neither end holds a
whole shard in memory.

A chunk body is ``[from node, group, snapshot index, offset, total bytes, data, message]``
where ``message`` is the SNAP message's wire form (its image left out) on the last chunk
and None before. Chunks of one transfer arrive in order (one TCP connection); a gap, a
chunk of another transfer, or a lost connection abandon the transfer, and Raft sends the
snapshot again when it next probes the follower.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from pykv.client.transport import SNAPSHOT_CHUNK
from pykv.errors import CorruptData, ProtocolError
from pykv.net.protocol import Connection
from pykv.raft.messages import Message, MsgType, Snapshot
from pykv.replica.durable import HEADER_ROOM, image_file, open_image

log = logging.getLogger("pykv.snapshots")

CHUNK_BYTES = 1 << 20
# A partial image that has not grown for this long is dropped (its sender is gone).
STALE_AFTER_S = 60.0
# A received image is written back by the kernel every this many bytes, off the loop.
SYNC_EVERY = 32 << 20
# A transfer whose connection takes no data for this long fails (Raft then retries).
STALL_TIMEOUT_S = 30.0


def is_install(msg: Message) -> bool:
    """Whether msg is an InstallSnapshot carrying an image (or a handle to one)."""
    return msg.type == MsgType.SNAP and msg.snapshot is not None


class SnapshotSender:
    """Streams InstallSnapshot images to peers, at most one per (peer, group) at a time."""

    def __init__(
        self,
        node_id: int,
        connect: Callable[[int], Awaitable[Connection | None]],
        failed: Callable[[int, int], None],
        sending: Callable[[int, int, bool], None] = lambda group, to, active: None,
        *,
        chunk_bytes: int = CHUNK_BYTES,
        directory: Path | None = None,
    ) -> None:
        self.node_id = node_id
        self.directory = directory  # where images are written before they are sent
        if directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
        self._connect = connect  # peer id -> its connection, or None when unreachable
        self._failed = failed  # (group, peer): the transfer broke off; Raft should retry
        self._sending = sending  # (group, peer, active): a transfer started or ended
        self.chunk_bytes = chunk_bytes
        self._outgoing: dict[tuple[int, int], asyncio.Task] = {}  # (peer, group) -> transfer
        self.sent = 0  # images streamed to the end (for status and tests)

    def send(self, msg: Message) -> None:
        """Start streaming msg's image, unless one is already on its way there: Raft sends
        InstallSnapshot again each time it probes a follower still catching up, with a newer
        snapshot if one was taken meanwhile, and replacing a transfer under way with a newer
        one would, under steady writes, never let any of them arrive."""
        assert msg.snapshot is not None
        key = (msg.to, msg.group)
        running = self._outgoing.get(key)
        if running is not None and not running.done():
            return
        task = asyncio.get_running_loop().create_task(self._stream(msg))
        self._outgoing[key] = task
        self._sending(msg.group, msg.to, True)
        task.add_done_callback(lambda t: self._ended(key, t))

    def _ended(self, key: tuple[int, int], task: asyncio.Task) -> None:
        if self._outgoing.get(key) is task:
            del self._outgoing[key]
            self._sending(key[1], key[0], False)

    async def _stream(self, msg: Message) -> None:
        assert msg.snapshot is not None
        to, group, index = msg.to, msg.group, msg.snapshot.meta.index
        try:
            conn = await self._connect(to)
            if conn is None:
                raise ConnectionError(f"node {to} is unreachable")
            started = time.monotonic()
            # Made (or opened in its file) only now: not again for each probe while it travels.
            with await self._open(msg.snapshot.data) as image:
                if image is None:
                    raise CorruptData("the snapshot keeps no image to send")
                total = _remaining(image)
                made = time.monotonic() - started
                head = replace(msg, snapshot=Snapshot(msg.snapshot.meta, None)).to_wire()
                offset = 0
                while True:
                    data = image.read(self.chunk_bytes)
                    last = offset + len(data) >= total
                    if not data and not last:
                        raise CorruptData(f"the image ended at {offset} of {total} bytes")
                    conn.send(SNAPSHOT_CHUNK, [self.node_id, group, index, offset, total,
                                               data, head if last else None])
                    # A peer that stops reading for this long is taken for gone (a half-open
                    # connection would otherwise hold the transfer, and the log, for ever).
                    await asyncio.wait_for(conn.drain(), STALL_TIMEOUT_S)
                    # drain() returns at once while the socket takes everything: yield anyway,
                    # or a big image would hold the loop (ticks, heartbeats) until it is all sent.
                    await asyncio.sleep(0)
                    if conn.closed:
                        raise ConnectionError(f"the connection to node {to} closed")
                    if last:
                        break
                    offset += len(data)
            self.sent += 1
            log.info("sent the snapshot of group %d at index %d to node %d: %d bytes, made in "
                     "%.2fs, sent in %.2fs", group, index, to, total, made,
                     time.monotonic() - started - made)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure: Raft retries the snapshot
            log.warning("sending the snapshot of group %d at index %d to node %d failed: %s",
                        group, index, to, exc)
            self._failed(group, to)

    async def _open(self, data: Any) -> contextlib.AbstractContextManager[BinaryIO | None]:
        """The image as a file. A state machine's image (pykv.replica.host.StateImage) is
        written into a temporary file a part at a time, the loop running other work in
        between (the shard goes on committing: the image is copy on write, see
        replica.host.image_parts), so that
        imaging a big shard holds neither the loop nor the whole image in memory."""
        parts = getattr(data, "parts", None)
        if parts is None:
            return open_image(data)
        f = tempfile.TemporaryFile(dir=self.directory)  # on the node's disk, not a tmpfs
        try:
            with contextlib.closing(parts()) as image_parts:
                written = 0
                for part in image_parts:
                    f.write(part)
                    written += len(part)
                    if written >= self.chunk_bytes:
                        written = 0
                        await asyncio.sleep(0)
            f.seek(0)
        except BaseException:
            f.close()
            raise
        return f

    def cancel_group(self, group: int) -> None:
        """Stop sending the group's images (this node no longer leads it)."""
        for (_, gid), task in list(self._outgoing.items()):
            if gid == group:
                task.cancel()

    def close(self) -> None:
        for task in self._outgoing.values():
            task.cancel()


@dataclass(eq=False)
class ReceivedImage:
    """A received image, in a file of its own until nothing refers to it any more (the
    snapshot was persisted and restored, and Raft then holds the node's own handle)."""

    path: Path  # an image_file: the image starts HEADER_ROOM bytes in

    def __post_init__(self) -> None:
        weakref.finalize(self, _unlink, self.path)

    @property
    def roomy_file(self) -> Path:
        """Persisting the snapshot adopts this file rather than copy it (NodeLog.save_snapshot)."""
        return self.path

    def open(self) -> BinaryIO:
        f = open(self.path, "rb")
        f.seek(HEADER_ROOM)
        return f

    def load(self) -> bytes:
        with self.open() as f:
            return f.read()


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


@dataclass
class _Incoming:
    index: int
    total: int
    file: BinaryIO
    received: int = 0
    started: float = 0.0
    updated: float = 0.0
    unsynced: int = 0  # bytes written since the last background sync (_sync_soon)

    def abandon(self) -> None:
        self.file.close()
        _unlink(Path(self.file.name))


class SnapshotReceiver:
    """Puts images back together from SNAPSHOT_CHUNK bodies and steps each whole message.

    Chunks go straight into a file in ``directory`` (emptied when the receiver starts: what
    is there was left by a crash), so an image never has to fit in memory.
    """

    def __init__(self, step: Callable[[Message], None], directory: Path, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._step = step
        self.directory = Path(directory)
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._incoming: dict[tuple[int, int], _Incoming] = {}
        self.received = 0  # whole images stepped (for status and tests)

    def chunk(self, body: Any) -> None:
        """One chunk. Raises ProtocolError for a malformed one (the connection then closes)."""
        frm, group, index, offset, total, data, head = _parse(body)
        now = self._clock()
        self._drop_stale(now)
        key = (frm, group)
        incoming = self._incoming.get(key)
        if offset == 0:
            if incoming is not None:
                log.warning("abandoned the snapshot of group %d at index %d from node %d at %d of "
                            "%d bytes: another one started", group, incoming.index, frm,
                            incoming.received, incoming.total)
                incoming.abandon()
            incoming = self._incoming[key] = self._start(frm, group, index, total)
            incoming.started = now
        elif incoming is None or (incoming.index, incoming.total, incoming.received) != (index, total, offset):
            # The start of this transfer went missing (a reconnect, or a newer snapshot
            # started): drop it; Raft sends the snapshot again.
            self._abandon(key)
            log.warning("dropped a chunk of group %d's snapshot at index %d from node %d at "
                        "offset %d: it does not continue a transfer (%s)", group, index, frm,
                        offset, "none under way" if incoming is None else
                        f"at index {incoming.index}, {incoming.received} of {incoming.total} bytes")
            return
        incoming.received += len(data)
        incoming.updated = now
        if incoming.received > total:
            self._abandon(key)
            raise ProtocolError(f"snapshot chunks of group {group} exceed their total of {total} bytes")
        incoming.file.write(data)
        incoming.unsynced += len(data)
        if incoming.unsynced >= SYNC_EVERY:
            incoming.unsynced = 0
            _sync_soon(incoming.file)
        if head is None:
            return
        if incoming.received != total:
            self._abandon(key)
            raise ProtocolError(f"snapshot of group {group} ended at {incoming.received} of {total} bytes")
        try:
            msg = _message(head, frm, group, index)
        except ProtocolError:
            self._abandon(key)
            raise
        del self._incoming[key]
        incoming.file.close()
        self.received += 1
        log.info("received the snapshot of group %d at index %d from node %d: %d bytes in %.2fs",
                 group, index, frm, total, now - incoming.started)
        image = ReceivedImage(Path(incoming.file.name))
        self._step(replace(msg, snapshot=Snapshot(msg.snapshot.meta, image)))

    def _start(self, frm: int, group: int, index: int, total: int) -> _Incoming:
        fd, path = tempfile.mkstemp(dir=self.directory, prefix=f"g{group}-i{index}-from{frm}-", suffix=".img")
        os.close(fd)
        return _Incoming(index, total, image_file(Path(path)))  # unbuffered: chunks are big already

    def _abandon(self, key: tuple[int, int]) -> None:
        incoming = self._incoming.pop(key, None)
        if incoming is not None:
            incoming.abandon()

    def _drop_stale(self, now: float) -> None:
        for key, incoming in list(self._incoming.items()):
            if now - incoming.updated > STALE_AFTER_S:
                self._abandon(key)

    def close(self) -> None:
        for key in list(self._incoming):
            self._abandon(key)

    @property
    def partial(self) -> int:
        """Transfers under way."""
        return len(self._incoming)


def _sync_soon(f: BinaryIO) -> None:
    """Have the kernel write what the file holds so far, on a worker thread: when the whole
    image is persisted (fsync'd on the loop), little is left to write."""
    with contextlib.suppress(RuntimeError):  # no loop (a test driving the receiver by hand)
        asyncio.get_running_loop().run_in_executor(None, _fdatasync_quietly, f.fileno())


def _fdatasync_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):  # closed meanwhile (abandoned, or done): nothing to do
        os.fdatasync(fd)


def _remaining(f: BinaryIO) -> int:
    """Bytes from f's position to its end."""
    here = f.tell()
    end = f.seek(0, io.SEEK_END)
    f.seek(here)
    return end - here


def _parse(body: Any) -> tuple[int, int, int, int, int, bytes, Any]:
    if not (isinstance(body, list) and len(body) == 7):
        raise ProtocolError("a SNAPSHOT_CHUNK body must be [from, group, index, offset, total, data, message]")
    frm, group, index, offset, total, data, head = body
    if not all(isinstance(v, int) and v >= 0 for v in (frm, group, index, offset, total)):
        raise ProtocolError("a SNAPSHOT_CHUNK's from, group, index, offset and total must be ints >= 0")
    if not isinstance(data, bytes):
        raise ProtocolError("a SNAPSHOT_CHUNK's data must be bytes")
    return frm, group, index, offset, total, data, head


def _message(head: Any, frm: int, group: int, index: int) -> Message:
    try:
        msg = Message.from_wire(head)
    except (ValueError, TypeError, IndexError) as exc:
        raise ProtocolError(f"malformed snapshot message: {exc}") from None
    if not is_install(msg) or (msg.frm, msg.group, msg.snapshot.meta.index) != (frm, group, index):
        raise ProtocolError("a snapshot's last chunk must carry its own InstallSnapshot message")
    return msg
