"""The embedded server's hostile modes (flood, tiny-chunks, unrequested-context,
slowloris): a raw client sees exactly these streams, and the server stays well.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from support.inprocess import disk, serving
from support.raw import (
    CLIENT_FLAGS,
    GREETING_SIZE,
    RawClient,
    handshake_to_go,
    info_type,
    request,
)
from support.streams import WrappedStream

from blockdrv.protocol import Command, CommandFlag
from blockdrv.protocol.constants import ChunkType, Info, Option, OptionReply, ReplyFlag
from blockdrv.protocol.options import (
    decode_rep_meta_context,
    decode_rep_server,
    encode_info_request,
    encode_meta_context_request,
    encode_option,
)
from blockdrv.protocol.wire import decode_block_status, decode_error, decode_hole
from blockdrv.server import Export, NBDServer
from blockdrv.util.units import MiB


class Sink(trio.abc.Stream):
    """A client that sends ``said`` and then swallows everything without a checkpoint
    (as a socket with room does), keeping the first ``keep`` bytes.

    If the server ever sends ``starve_limit`` bytes while no other task runs, it would
    freeze the whole server: that is recorded in ``starved``.  After ``leave_after``
    bytes the client goes away (sends fail).
    """

    def __init__(self, said: bytes, keep: int = 1 << 18, starve_limit: int = 1 << 20,
                 leave_after: int = 8 << 20) -> None:
        self.incoming = bytearray(said)
        self.kept = bytearray()
        self.keep, self.starve_limit, self.leave_after = keep, starve_limit, leave_after
        self.sent = 0
        self.since_others_ran = 0
        self.starved = False
        self.gone = trio.Event()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self.incoming:
            await self.gone.wait()
            return b""
        n = len(self.incoming) if max_bytes is None else max_bytes
        data = bytes(self.incoming[:n])
        del self.incoming[:n]
        return data

    async def send_all(self, data) -> None:  # type: ignore[no-untyped-def]
        if self.gone.is_set():
            raise trio.BrokenResourceError("the client went away")
        self.sent += len(data)
        self.since_others_ran += len(data)
        self.starved |= self.since_others_ran > self.starve_limit
        if len(self.kept) < self.keep:
            self.kept += bytes(data[:self.keep - len(self.kept)])
        if self.sent > self.leave_after:
            self.gone.set()

    async def wait_send_all_might_not_block(self) -> None:
        pass

    async def aclose(self) -> None:
        self.gone.set()

    async def others_run(self) -> None:
        """Another task of the server's process: runs whenever the server lets it."""
        while True:
            await trio.sleep(0)
            self.since_others_ran = 0

    def kept_stream(self) -> RawClient:
        """A raw client reading what was kept."""
        send, receive = trio.testing.memory_stream_one_way_pair()
        send.send_all_hook = None
        receive.put_data(bytes(self.kept))
        receive.put_eof()
        return RawClient(receive)


async def flood_through(export: Export, said: bytes) -> RawClient:
    """Serve ``said`` from a sink client until it leaves; check the server never froze,
    ended the connection and still serves; a raw client over the bytes it sent."""
    server = NBDServer(export)
    sink = Sink(said)
    with trio.fail_after(120):
        async with serving(server) as rig:
            async with trio.open_nursery() as others:
                others.start_soon(sink.others_run)
                await server.handle_stream(sink)  # returns once the client has gone
                others.cancel_scope.cancel()
            assert sink.gone.is_set() and not sink.starved
            assert server.statistics().connections == 0
            export.faults.clear()
            client = await rig.client()  # a fresh client is served
            assert await client.pread(512, 0) == bytes(512)
    assert export.faults.injected["flood"] == 1
    return sink.kept_stream()


GO = encode_option(Option.GO, encode_info_request("", [Info.NAME]))
INFO = encode_option(Option.INFO, encode_info_request("", []))
SET = encode_option(Option.SET_META_CONTEXT, encode_meta_context_request("", ["base:allocation"]))
LIST_META = encode_option(Option.LIST_META_CONTEXT, encode_meta_context_request("", []))


@pytest.mark.parametrize("option, said", [
    (Option.GO, GO), (Option.INFO, INFO), (Option.LIST, encode_option(Option.LIST)),
])
async def test_flood_of_info_and_server_replies(option, said):
    export = disk(4 * MiB)
    export.faults.flood(commands=())
    raw = await flood_through(export, CLIENT_FLAGS + said)
    await raw.take(GREETING_SIZE)
    replies = [await raw.option_reply() for _ in range(2000)]
    assert {r.option for r in replies} == {option}
    if option == Option.LIST:
        assert {r.type for r in replies} == {OptionReply.SERVER}
        names = [decode_rep_server(r.data)[0] for r in replies]
        assert names[:3] == ["", "flood-0", "flood-1"]  # the real answer first
        assert len(set(names)) == len(names)
    else:
        assert {r.type for r in replies} == {OptionReply.INFO}  # never an ACK
        types = [info_type(r) for r in replies]
        assert types[0] == Info.EXPORT  # the real answer first, then the flood
        flood = types[types.index(Info.BLOCK_SIZE) + 1:]
        assert flood[0::2] == [Info.NAME] * len(flood[0::2])
        unknown = flood[1::2]
        assert min(unknown) >= 0x4000 and len(set(unknown)) == len(unknown)


@pytest.mark.parametrize("option, said", [
    (Option.SET_META_CONTEXT, SET), (Option.LIST_META_CONTEXT, LIST_META),
])
async def test_flood_of_meta_contexts(option, said):
    export = disk(4 * MiB)
    export.faults.flood(option, commands=())
    raw = await flood_through(export, CLIENT_FLAGS + encode_option(Option.STRUCTURED_REPLY)
                              + said)
    await raw.take(GREETING_SIZE)
    assert (await raw.option_reply()).type == OptionReply.ACK  # STRUCTURED_REPLY
    replies = [await raw.option_reply() for _ in range(2000)]
    assert {(r.option, r.type) for r in replies} == {(option, OptionReply.META_CONTEXT)}
    contexts = [decode_rep_meta_context(r.data) for r in replies]
    assert contexts[0][1] == "base:allocation"
    assert [name for _, name in contexts[1:4]] == ["qemu:flood-0", "qemu:flood-1",
                                                   "qemu:flood-2"]
    assert len({name for _, name in contexts}) == len(contexts)
    ids = [context_id for context_id, _ in contexts]
    if option == Option.SET_META_CONTEXT:
        assert ids[:3] == [1, 2, 3] and len(set(ids)) == len(ids)
    else:
        assert set(ids) == {0}


@pytest.mark.parametrize("command", [Command.READ, Command.BLOCK_STATUS])
async def test_flood_of_chunks(command):
    export = disk(4 * MiB)
    export.faults.flood(options=())
    raw = await flood_through(export, handshake_to_go() + request(command, 0, 65536,
                                                                  cookie=7))
    await raw.enter_transmission()
    chunks = [await raw.chunk() for _ in range(2000)]
    assert {c.header.cookie for c in chunks} == {7}
    assert not any(c.header.flags & ReplyFlag.DONE for c in chunks)
    if command == Command.READ:
        assert {c.header.type for c in chunks} == {ChunkType.ERROR}
        messages = [decode_error(c.payload, ChunkType.ERROR)[1] for c in chunks]
        assert messages[:2] == ["flood 0", "flood 1"]
    else:
        assert {c.header.type for c in chunks} == {ChunkType.BLOCK_STATUS_EXT}
        assert {decode_block_status(c.payload, extended=True)[0] for c in chunks} == {1}


async def test_flood_on_a_schedule_until_the_client_goes_away():
    export = disk(4 * MiB)
    export.faults.flood(options=(), every=3)  # every 3rd READ or BLOCK_STATUS
    server = NBDServer(export)
    with trio.fail_after(60):
        async with serving(server) as rig:
            raw = await rig.raw(lockstep=True)  # the server waits for the reader
            await raw.take(GREETING_SIZE)
            await raw.send(handshake_to_go())
            await raw.until_ack(Option.GO)
            for cookie in (1, 2):
                await raw.send(request(Command.READ, 0, 512, cookie=cookie))
                chunk = await raw.chunk()
                while not chunk.header.flags & ReplyFlag.DONE:
                    chunk = await raw.chunk()
                assert chunk.header.cookie == cookie
            await raw.send(request(Command.READ, 0, 512, cookie=3))
            for _ in range(500):
                chunk = await raw.chunk()
                assert chunk.header.cookie == 3 and chunk.header.type == ChunkType.ERROR
                assert not chunk.header.flags & ReplyFlag.DONE
            await raw.stream.aclose()  # the client goes away: so does the flood
            await server.open_connections.wait_value(0)
            assert export.faults.injected["flood"] == 1


# --- tiny chunks ------------------------------------------------------------------------


async def test_tiny_chunks_cover_the_read_in_random_order():
    export = disk(4 * MiB)
    server = NBDServer(export, seed=5)
    data = bytes(range(256)) * 16
    with trio.fail_after(60):
        async with serving(server) as rig:
            writer = await rig.client()
            await writer.pwrite(data, 65536 - 2048)  # data, and holes around it
            raw = await rig.raw()
            connection = rig.connection_of[id(raw)]
            connection.faults.tiny_chunks(64, min_size=3)  # this connection only
            await raw.send(handshake_to_go() + request(Command.READ, 61440, 8192,
                                                       cookie=9))
            await raw.enter_transmission()
            got = bytearray(8192)
            covered, offsets = 0, []
            done = False
            while not done:
                chunk = await raw.chunk()
                done = bool(chunk.header.flags & ReplyFlag.DONE)  # on the last chunk
                if chunk.header.type == ChunkType.OFFSET_DATA:
                    at, piece = int.from_bytes(chunk.payload[:8], "big"), chunk.payload[8:]
                else:
                    assert chunk.header.type == ChunkType.OFFSET_HOLE
                    at, n = decode_hole(chunk.payload)
                    piece = bytes(n)
                assert 1 <= len(piece) <= 64  # 3 at least, but where a segment ends
                got[at - 61440:at - 61440 + len(piece)] = piece
                covered += len(piece)
                offsets.append(at)
            assert covered == 8192 and bytes(got) == bytes(2048) + data + bytes(2048)
            assert offsets != sorted(offsets)
            assert connection.faults.injected["tiny-chunks"] == 1
            # Other connections are served as usual.
            assert await writer.pread(4096, 65536 - 2048) == data


async def test_tiny_chunks_leave_df_reads_whole():
    export = disk(4 * MiB)
    export.faults.tiny_chunks(8)
    server = NBDServer(export)
    with trio.fail_after(60):
        async with serving(server) as rig:
            raw = await rig.raw()
            await raw.send(handshake_to_go() + request(
                Command.READ, 0, 4096, cookie=3, flags=CommandFlag.DF))
            await raw.enter_transmission()
            chunk = await raw.chunk()
            assert chunk.header.flags & ReplyFlag.DONE and len(chunk.payload) == 8 + 4096
    assert export.faults.injected["tiny-chunks"] == 0


# --- unrequested context ------------------------------------------------------------------


async def test_set_meta_context_offers_a_context_not_asked_for():
    export = disk(4 * MiB)
    export.faults.unrequested_context()
    server = NBDServer(export)
    with trio.fail_after(60):
        async with serving(server) as rig:
            raw = await rig.raw()
            await raw.send(CLIENT_FLAGS + encode_option(Option.STRUCTURED_REPLY) + SET
                           + LIST_META)
            await raw.take(GREETING_SIZE)
            await raw.until_ack(Option.STRUCTURED_REPLY)
            answer = await raw.until_ack(Option.SET_META_CONTEXT)
            assert [decode_rep_meta_context(r.data) for r in answer[:-1]] == [
                (2, "qemu:evil"), (1, "base:allocation")]
            listed = await raw.until_ack(Option.LIST_META_CONTEXT)  # only SET is touched
            assert [decode_rep_meta_context(r.data) for r in listed[:-1]] == [
                (0, "base:allocation")]
    assert export.faults.injected["unrequested-context"] == 1


# --- slowloris ---------------------------------------------------------------------------


class PieceCounter(WrappedStream):
    """Records each send_all the server makes, with its time."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        super().__init__(inner)
        self.sends: list[tuple[float, int]] = []

    async def send_all(self, data) -> None:  # type: ignore[no-untyped-def]
        self.sends.append((trio.current_time(), len(data)))
        await self.inner.send_all(data)


async def test_slowloris_trickles_option_and_request_replies(autojump_clock):
    export = disk(4 * MiB)
    server = NBDServer(export, seed=1)
    with trio.fail_after(600):
        async with serving(server) as rig:
            writer = await rig.client()
            await writer.pwrite(b"s" * 512, 0)
            export.faults.slowloris(max_piece=5, delay=0.5)
            counted: PieceCounter | None = None

            def count(stream: trio.abc.Stream) -> PieceCounter:
                nonlocal counted
                counted = PieceCounter(stream)
                return counted

            raw = await rig.raw(wrap=count)
            assert counted is not None
            await raw.send(handshake_to_go() + request(Command.READ, 0, 512, cookie=4))
            await raw.enter_transmission()
            header_and_data = []
            while True:
                chunk = await raw.chunk()
                header_and_data.append(chunk)
                if chunk.header.flags & ReplyFlag.DONE:
                    break
            assert b"".join(c.payload[8:] for c in header_and_data
                            if c.header.type == ChunkType.OFFSET_DATA) == b"s" * 512
            after_greeting = counted.sends[1:]
            assert all(1 <= n <= 5 for _, n in after_greeting)
            times = [t for t, _ in after_greeting]
            assert all(b - a >= 0.5 for a, b in zip(times, times[1:], strict=False))
    # 3 options (EXTENDED_HEADERS, SET_META_CONTEXT, GO) and 1 reply
    assert export.faults.injected["slowloris"] == 4
