"""InstallSnapshot images travel in chunks over a real connection on 127.0.0.1: an image
larger than a frame arrives whole, once per transfer, and a broken transfer is reported to
Raft and never stepped half-received."""

from __future__ import annotations

import asyncio
import os

import pytest

from pykv.client.transport import SNAPSHOT_CHUNK
from pykv.errors import ProtocolError
from pykv.net.framing import encode_frame
from pykv.net.protocol import Connection, ServerProtocol, new_event_loop
from pykv.raft.messages import ConfState, Message, MsgType, Snapshot, SnapshotMeta
from pykv.replica.durable import HEADER_ROOM
from pykv.server.snapshots import SnapshotReceiver, SnapshotSender

MAX_FRAME = 256 << 10
CHUNK = 64 << 10


def run(coro):
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(coro)


def install(image: object, *, index: int = 40, group: int = 3, frm: int = 1, to: int = 2) -> Message:
    meta = SnapshotMeta(index, 2, ConfState(frozenset({1, 2, 3})))
    return Message(MsgType.SNAP, to=to, frm=frm, term=2, snapshot=Snapshot(meta, image), group=group)


class Handle:
    """A snapshot handle as Raft holds one (pykv.replica.durable): loaded on demand, counted."""

    def __init__(self, image: bytes) -> None:
        self.image = image
        self.loads = 0

    def load(self) -> bytes:
        self.loads += 1
        return self.image


class Follower(ServerProtocol):
    """The receiving node's end: SNAPSHOT_CHUNK bodies go to a SnapshotReceiver."""

    def __init__(self, rig: Rig) -> None:
        super().__init__(MAX_FRAME)
        self.rig = rig
        rig.connections.append(self)

    held = False

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if self.rig.hold:  # a slow follower: the sender must wait for the connection to drain
            self.held = True
            # (after this callback: uvloop starts reading once connection_made returns)
            self._loop.call_soon(transport.pause_reading)

    def _update_reading(self) -> None:
        if not self.held:  # (flow control would resume reading)
            super()._update_reading()

    def release(self) -> None:
        self.held = False
        self.transport.resume_reading()

    def request_received(self, kind: int, request_id: int, body: object) -> None:
        assert kind == SNAPSHOT_CHUNK
        self.rig.chunks += 1
        self.rig.receiver.chunk(body)


class Rig:
    def __init__(self, directory, *, hold: bool = False) -> None:
        self.hold = hold
        self.stepped: list[Message] = []
        self.receiver = SnapshotReceiver(self.stepped.append, directory)
        self.connections: list[Follower] = []
        self.chunks = 0
        self.failed: list[tuple[int, int]] = []
        self.sending: list[tuple[int, int, bool]] = []

    async def __aenter__(self) -> Rig:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: Follower(self), "127.0.0.1", 0)
        address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        self.conn = await Connection.open(address, max_frame=MAX_FRAME)

        async def connect(peer: int) -> Connection | None:
            return self.conn

        self.sender = SnapshotSender(1, connect, lambda g, to: self.failed.append((g, to)),
                                     lambda g, to, active: self.sending.append((g, to, active)),
                                     chunk_bytes=CHUNK)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.sender.close()
        self.conn.close()
        self.server.close()
        await self.server.wait_closed()

    def release(self) -> None:
        self.connections[0].release()

    async def until(self, condition, timeout: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not condition():
            assert asyncio.get_running_loop().time() < deadline, "the condition never held"
            await asyncio.sleep(0.01)


def test_an_image_larger_than_a_frame_arrives_whole_with_its_message(tmp_path):
    image = os.urandom(3 << 20)  # incompressible, 12 times max_frame
    with pytest.raises(ProtocolError, match="max_frame"):
        encode_frame(SNAPSHOT_CHUNK, install(image).to_wire(), max_frame=MAX_FRAME)

    async def main() -> None:
        async with Rig(tmp_path) as rig:
            handle = Handle(image)
            rig.sender.send(install(handle))
            # The sender counts it once its last chunk has drained, which may come after
            # the receiver stepped the message.
            await rig.until(lambda: rig.stepped and rig.sender.sent)
            (msg,) = rig.stepped
            assert msg.snapshot.data.load() == image
            assert (msg.type, msg.frm, msg.to, msg.group, msg.term) == (MsgType.SNAP, 1, 2, 3, 2)
            assert msg.snapshot.meta == install(b"").snapshot.meta
            assert rig.chunks == len(image) // CHUNK
            assert (handle.loads, rig.sender.sent, rig.failed) == (1, 1, [])

    run(main())


def test_the_loop_runs_other_work_between_two_chunks(tmp_path):
    # A node's loop also ticks every Raft group and sends heartbeats: a sender that held it
    # for a whole big image would get its groups' leaders deposed meanwhile.
    image = os.urandom(16 << 20)

    async def main() -> None:
        async with Rig(tmp_path) as rig:
            loop = asyncio.get_running_loop()
            turns = 0

            def ticker() -> None:
                nonlocal turns
                turns += 1
                if not rig.stepped:
                    loop.call_soon(ticker)

            loop.call_soon(ticker)
            rig.sender.send(install(Handle(image)))
            await rig.until(lambda: rig.sender.sent)
            assert turns >= len(image) // CHUNK

    run(main())


def test_a_resent_snapshot_already_on_its_way_is_not_sent_again(tmp_path):
    # Raft sends InstallSnapshot again each time it probes a follower still catching up.
    image = os.urandom(2 << 20)

    async def main() -> None:
        async with Rig(tmp_path) as rig:
            handle = Handle(image)
            for _ in range(5):
                rig.sender.send(install(handle))
            await rig.until(lambda: rig.stepped)
            await asyncio.sleep(0.1)
            assert len(rig.stepped) == 1 and handle.loads == 1
            assert rig.chunks == len(image) // CHUNK
            # Once it has arrived, a new request (the follower fell behind again) is sent.
            rig.sender.send(install(handle))
            await rig.until(lambda: len(rig.stepped) == 2)

    run(main())


def test_a_newer_snapshot_waits_for_the_one_under_way_which_arrives(tmp_path):
    # Under steady writes the leader takes newer snapshots while an image travels; giving up
    # the one under way for each of them would never let any arrive.
    async def main() -> None:
        async with Rig(tmp_path, hold=True) as rig:
            first = os.urandom(16 << 20)
            rig.sender.send(install(Handle(first), index=40))
            await asyncio.sleep(0.2)  # stuck: the follower reads nothing yet
            assert rig.sending == [(3, 2, True)]
            rig.sender.send(install(Handle(os.urandom(1 << 20)), index=90))
            rig.release()
            await rig.until(lambda: rig.stepped and rig.sending[-1] == (3, 2, False))
            await asyncio.sleep(0.1)
            assert [m.snapshot.meta.index for m in rig.stepped] == [40]
            assert rig.stepped[0].snapshot.data.load() == first
            assert rig.sending == [(3, 2, True), (3, 2, False)]  # the log may be compacted again
            newer = os.urandom(1 << 20)
            rig.sender.send(install(Handle(newer), index=90))  # the follower is still behind
            await rig.until(lambda: len(rig.stepped) == 2)
            assert rig.stepped[1].snapshot.data.load() == newer

    run(main())


def test_a_node_that_stops_leading_a_group_stops_sending_its_images(tmp_path):
    async def main() -> None:
        async with Rig(tmp_path, hold=True) as rig:
            rig.sender.send(install(Handle(os.urandom(32 << 20)), group=3))
            other = os.urandom(1 << 20)
            rig.sender.send(install(Handle(other), group=4, to=2))
            await asyncio.sleep(0.2)
            rig.sender.cancel_group(3)  # a new leader of group 3 sends its own image
            rig.release()
            await rig.until(lambda: rig.sender.sent == 1)
            await asyncio.sleep(0.2)
            assert [m.group for m in rig.stepped] == [4] and rig.failed == []

    run(main())


def test_a_transfer_cut_off_is_reported_and_never_stepped(tmp_path):
    async def main() -> None:
        async with Rig(tmp_path, hold=True) as rig:
            rig.sender.send(install(Handle(os.urandom(32 << 20))))
            await asyncio.sleep(0.3)
            assert rig.sender.sent == 0
            rig.connections[0].transport.abort()  # the follower's node went away
            await rig.until(lambda: rig.failed)
            assert rig.failed == [(3, 2)]  # (group, follower): Raft probes it again
            assert rig.stepped == []

    run(main())


def chunk(offset: int, total: int, data: bytes, head=None, index: int = 40) -> list:
    return [1, 3, index, offset, total, data, head]


def test_receiver_drops_a_transfer_whose_start_it_missed(tmp_path):
    stepped: list[Message] = []
    receiver = SnapshotReceiver(stepped.append, tmp_path)
    head = install(None).to_wire()
    receiver.chunk(chunk(4, 8, b"5678", head))  # its first chunk never came (a reconnect)
    assert stepped == [] and receiver.partial == 0
    receiver.chunk(chunk(0, 8, b"1234"))
    receiver.chunk(chunk(0, 8, b"abcd"))  # restarted: the old pieces are dropped
    receiver.chunk(chunk(4, 8, b"efgh", head))
    assert [m.snapshot.data.load() for m in stepped] == [b"abcdefgh"]
    assert receiver.partial == 0


def test_images_are_files_that_go_once_done_with(tmp_path):
    (tmp_path / "g1-i9-from2-old.img").write_bytes(b"left by a crash")
    stepped: list[Message] = []
    receiver = SnapshotReceiver(stepped.append, tmp_path)
    assert list(tmp_path.iterdir()) == []
    receiver.chunk(chunk(0, 8, b"1234"))
    (partial,) = tmp_path.iterdir()
    # On disk, not in memory; after room for the header of the snapshot file it may become.
    assert partial.read_bytes() == bytes(HEADER_ROOM) + b"1234"
    receiver.chunk(chunk(4, 8, b"5678", install(None).to_wire()))
    assert stepped[0].snapshot.data.path == partial
    assert partial.read_bytes()[HEADER_ROOM:] == stepped[0].snapshot.data.load() == b"12345678"
    stepped.clear()  # persisted and restored: Raft holds the node's own handle now
    assert list(tmp_path.iterdir()) == []
    receiver.chunk(chunk(0, 8, b"1234"))
    receiver.chunk(chunk(0, 4, b"abcd"))  # a new transfer: the old partial file goes
    assert [p.read_bytes()[HEADER_ROOM:] for p in tmp_path.iterdir()] == [b"abcd"]
    receiver.close()
    assert list(tmp_path.iterdir()) == []


def test_receiver_drops_a_transfer_left_unfinished_for_a_minute(tmp_path):
    now = [0.0]
    receiver = SnapshotReceiver(lambda m: None, tmp_path, clock=lambda: now[0])
    receiver.chunk(chunk(0, 8, b"1234"))
    assert receiver.partial == 1
    now[0] = 61.0
    receiver.chunk([2, 5, 7, 0, 4, b"abcd", None])  # another transfer arrives later
    assert receiver.partial == 1  # only the new one is held


@pytest.mark.parametrize("body, error", [
    ([1, 3, 40, 0, 8], "must be"),
    ([1, 3, -1, 0, 8, b"12", None], "ints >= 0"),
    ([1, 3, 40, 0, 8, "text", None], "bytes"),
    ([1, 3, 40, 0, 2, b"123", None], "exceed"),
])
def test_receiver_refuses_malformed_chunks(body, error, tmp_path):
    with pytest.raises(ProtocolError, match=error):
        SnapshotReceiver(lambda m: None, tmp_path).chunk(body)


def test_receiver_refuses_a_last_chunk_that_is_short_or_carries_another_message(tmp_path):
    head = install(None).to_wire()
    receiver = SnapshotReceiver(lambda m: None, tmp_path)
    with pytest.raises(ProtocolError, match="ended at 4 of 8"):
        receiver.chunk(chunk(0, 8, b"1234", head))
    with pytest.raises(ProtocolError, match="its own InstallSnapshot"):
        receiver.chunk(chunk(0, 4, b"1234", install(None, group=9).to_wire()))
    heartbeat = Message(MsgType.HEARTBEAT, to=2, frm=1, term=2, group=3).to_wire()
    with pytest.raises(ProtocolError, match="its own InstallSnapshot"):
        receiver.chunk(chunk(0, 4, b"1234", heartbeat))
    with pytest.raises(ProtocolError, match="malformed snapshot message"):
        receiver.chunk(chunk(0, 4, b"1234", ["junk"]))


def test_node_options_refuse_a_frame_too_small_for_a_value_and_a_zero_snapshot_interval(capsys):
    from pykv.server.cli import build_parser
    from pykv.server.cmd_serve import config_from_args

    parser = build_parser()
    base = ["serve", "--id", "1", "--data-dir", "/nonexistent"]
    config = config_from_args(parser.parse_args([*base, "--max-frame-mb", "8", "--snapshot-every", "500"]))
    assert (config.max_frame, config.snapshot_every) == (8 << 20, 500)
    for bad, says in ((["--max-frame-mb", "0.5"], "must be at least 2.0"),
                      (["--snapshot-every", "0"], "must be at least 1"),
                      (["--snapshot-every", "ten"], "'ten' is not a number")):
        with pytest.raises(SystemExit):
            parser.parse_args([*base, *bad])
        assert says in capsys.readouterr().err
