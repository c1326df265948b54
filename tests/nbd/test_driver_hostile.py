"""The driver against servers that misbehave on purpose: liveness, bounds, identity.

The hostile server (tests/support/hostile.py) runs in a thread on a real Unix socket, so
when it floods, the client always has data to read: that is where a loop over peer data
without a checkpoint freezes the whole program.  Each test checks the promise that
DESIGN.md section 3 makes ("Liveness and bounds"): deadlines fire on time, other tasks
keep running, memory stays small, and a reply never reaches the wrong request.
"""

from __future__ import annotations

import random
import time
import tracemalloc
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import trio
from support.hostile import Connection, HostileServer, Script, repeat

from blockdrv import ConnectError, ProtocolError, open_nbd
from blockdrv.nbd.query import list_exports, list_meta_contexts
from blockdrv.protocol import negotiate, replies, wire
from blockdrv.protocol.constants import ChunkType, Command
from blockdrv.util.units import MiB


class LoopLag:
    """A task that wakes every 10 ms and records how late it was: a frozen event loop
    shows as a large lag."""

    def __init__(self) -> None:
        self.worst = 0.0

    async def run(self) -> None:
        while True:
            due = time.monotonic() + 0.01
            await trio.sleep(0.01)
            self.worst = max(self.worst, time.monotonic() - due)


@contextmanager
def uncapped(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Lift the caps, so only checkpoints can end a flood in time."""
    monkeypatch.setattr(negotiate, "MAX_INFO_REPLIES", 1 << 60)
    monkeypatch.setattr(negotiate, "MAX_LIST_ENTRIES", 1 << 60)
    monkeypatch.setattr(negotiate, "MAX_LIST_BYTES", 1 << 60)
    monkeypatch.setattr(replies, "MAX_REPLY_CHUNKS", 1 << 60)
    yield


def error_chunks(conn: Connection, request: wire.Request) -> Iterator[bytes]:
    """A READ answered with error chunks that never end (no DONE)."""
    return repeat(wire.encode_error_chunk(request.cookie, 5, "again", done=False))


async def within(deadline: float, call) -> tuple[str, float]:
    """Run ``call`` under ``move_on_after(deadline)``: (how it ended, seconds taken)."""
    start = time.monotonic()
    how = "returned"
    with trio.move_on_after(deadline) as scope:
        try:
            await call()
        except Exception as exc:  # noqa: BLE001 - reported, then asserted on
            how = type(exc).__name__
    if scope.cancelled_caught:
        how = "deadline"
    return how, time.monotonic() - start


# --- liveness: floods cannot freeze the program ---------------------------------------


FLOODS = {
    "info during GO": Script(flood_info=True),
    "export list": Script(flood_list=True),
    "context list": Script(flood_contexts=True),
    "error chunks for a READ": Script(reply=error_chunks),
}


async def flood_victim(kind: str, uri: str) -> None:
    if kind == "export list":
        await list_exports(uri)
    elif kind == "context list":
        await list_meta_contexts(uri)
    else:
        # A cancelled READ goes on reading its reply for cancel_timeout, then gives the
        # connection up: the deadline's bound is the deadline plus that.
        async with open_nbd(uri, cancel_timeout=0.25) as dev:
            await dev.pread(4096, 0)


@pytest.mark.parametrize("kind", list(FLOODS))
async def test_a_flooding_server_cannot_freeze_the_program(kind, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    """With the caps lifted, an enclosing deadline fires on time, however fast the
    server sends, and the other tasks of the program keep running."""
    lag = LoopLag()
    with uncapped(monkeypatch), HostileServer(tmp_path, FLOODS[kind]) as server, \
            trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lag.run)
            how, took = await within(1.0, lambda: flood_victim(kind, server.uri))
            nursery.cancel_scope.cancel()
    assert how == "deadline"
    assert took < 1.0 + 0.25 + 0.5, took
    assert lag.worst < 0.25, lag.worst


@pytest.mark.parametrize("option, message", [("connect_timeout", "longer than 1s"),
                                             ("open_timeout", "within 1s")])
async def test_open_timeouts_fire_while_the_server_floods(option, message, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch):
    with uncapped(monkeypatch), HostileServer(tmp_path, Script(flood_info=True)) as server, \
            trio.fail_after(30):
        start = time.monotonic()
        with pytest.raises(ConnectError, match=message):
            async with open_nbd(server.uri, **{option: 1}):
                pass
        assert time.monotonic() - start < 1.5


# --- bounds: every flood ends in a ProtocolError naming its cap -----------------------


CAPPED = {
    "info during GO": "MAX_INFO_REPLIES",
    "export list": "MAX_LIST_ENTRIES",
    "context list": "MAX_LIST_ENTRIES",
    "error chunks for a READ": "MAX_REPLY_CHUNKS",
}


@pytest.mark.parametrize("kind", list(CAPPED))
async def test_a_flood_ends_at_its_cap_with_little_memory(kind, tmp_path: Path):
    with HostileServer(tmp_path, FLOODS[kind]) as server, trio.fail_after(30):
        tracemalloc.start()
        try:
            with pytest.raises(ProtocolError, match=CAPPED[kind]):
                await flood_victim(kind, server.uri)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 24 * MiB, peak


async def test_a_context_nobody_asked_for_is_refused(tmp_path: Path):
    with HostileServer(tmp_path, Script(extra_context="qemu:evil")) as server, \
            trio.fail_after(30):
        with pytest.raises(ProtocolError, match="qemu:evil.*not asked for"):
            async with open_nbd(server.uri):
                pass


def pattern(offset: int, length: int) -> bytes:
    """The bytes the tiny-chunk server holds at ``offset`` (misplaced bytes show)."""
    return bytes((offset + i) % 251 for i in range(length))


def tiny_chunks(size: int, order: str):
    """READ replies cut into ``size``-byte data chunks sent in ``order``, generated
    lazily (tracemalloc sees the server thread's memory too)."""
    def reply(conn: Connection, request: wire.Request) -> Iterator[bytes]:
        starts: range | list[int] = range(0, request.length, size)
        if order == "reverse":
            starts = starts[::-1]
        elif order == "random":
            starts = list(starts)
            random.Random(7).shuffle(starts)
        block = bytearray()
        for start in starts:
            piece = pattern(request.offset + start, min(size, request.length - start))
            block += wire.encode_data_chunk_header(request.cookie, request.offset + start,
                                                   len(piece), done=False) + piece
            if len(block) > 1 << 16:
                yield bytes(block)
                block.clear()
        yield bytes(block) + wire.encode_none_chunk(request.cookie)
    return reply


@pytest.mark.parametrize("order", ["in-order", "reverse", "random"])
async def test_a_read_in_small_chunks_in_any_order_is_exact_and_small(order, tmp_path: Path):
    """A 1 MiB READ as 512-byte chunks (2048 of them, within the cap) in any order:
    the right bytes, with little bookkeeping (a few ranges, not one per chunk)."""
    with HostileServer(tmp_path, Script(size=4 * MiB, reply=tiny_chunks(512, order))) \
            as server, trio.fail_after(60):
        async with open_nbd(server.uri) as dev:
            tracemalloc.start()
            try:
                data = await dev.pread(MiB, MiB)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
    assert data == pattern(MiB, MiB)
    # The 1 MiB result, its copy, and the server thread's own 1 MiB blocks (tracemalloc
    # sees every thread): not per-chunk state.
    assert peak < 8 * MiB, peak


async def test_one_byte_chunks_end_at_the_chunk_cap(tmp_path: Path):
    """The issue's case: 1 MiB answered as 1-byte chunks (+137 MiB before)."""
    with HostileServer(tmp_path, Script(size=4 * MiB, reply=tiny_chunks(1, "reverse"))) \
            as server, trio.fail_after(60):
        async with open_nbd(server.uri) as dev:
            tracemalloc.start()
            try:
                with pytest.raises(ProtocolError, match="MAX_REPLY_CHUNKS"):
                    await dev.pread(MiB, 0)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
    assert peak < 4 * MiB, peak


# --- identity: a late duplicate reply never answers another request -------------------


def late_duplicate(structured: bool):
    """Every READ after the first is preceded by a repeat of the first READ's reply."""
    def reply(conn: Connection, request: wire.Request) -> Iterator[bytes]:
        if request.command == Command.READ and len(conn.replies_sent) > 0:
            yield conn.replies_sent[0]
        data = bytes([request.offset // 65536 + 1]) * request.length
        if structured:
            yield wire.encode_data_chunk_header(request.cookie, request.offset, len(data),
                                                done=True) + data
        else:
            yield wire.encode_simple_reply(request.cookie) + data
    return reply


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
async def test_a_late_duplicate_reply_is_a_protocol_error_not_data(structured, tmp_path: Path):
    script = Script(structured=structured, reply=late_duplicate(structured))
    with HostileServer(tmp_path, script) as server, trio.fail_after(30):
        async with open_nbd(server.uri, max_in_flight=1, structured=structured) as dev:
            assert await dev.pread(4096, 0) == b"\x01" * 4096
            buf = bytearray(b"\xee" * 4096)
            with pytest.raises(ProtocolError, match="unknown cookie"):
                await dev.pread_into(buf, 65536)
            assert buf == b"\xee" * 4096  # nothing of the old reply landed here


def test_error_chunks_types_are_what_the_flood_sends():
    """(The flood above is made of real error chunks: its header says so.)"""
    chunk = wire.encode_error_chunk(1, 5, "again", done=False)
    header = wire.decode_reply_header(chunk[:wire.STRUCTURED_REPLY_SIZE])
    assert header.type == ChunkType.ERROR and not header.done
