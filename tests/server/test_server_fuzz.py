"""Hostile clients: generated option and request streams never crash the server.

Each example runs a fresh server over trio.testing memory streams, throws a generated
byte stream at it, and checks that the connection ends cleanly (the server logs no
error), that memory stays bounded, and that a well-behaved client on the same server is
not disturbed.
"""

from __future__ import annotations

import logging
import struct
import tracemalloc

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.client import AsyncClient

from blockdrv.protocol.constants import (
    EXTENDED_REQUEST_MAGIC,
    IHAVEOPT,
    REQUEST_MAGIC,
    Command,
    Info,
    Option,
)
from blockdrv.protocol.options import (
    encode_info_request,
    encode_meta_context_request,
    encode_option,
)
from blockdrv.server import Export, MemoryBackend, NBDServer
from blockdrv.util.units import MiB

u32 = st.integers(0, 0xFFFFFFFF)
edge_offsets = st.sampled_from([0, 1, 511, 512, 4096, MiB - 512, MiB, MiB + 1, 1 << 32,
                                (1 << 63) - 1, (1 << 64) - 1])
edge_lengths = st.sampled_from([0, 1, 512, 4096, 65536, MiB, 32 * MiB, 32 * MiB + 1,
                                0xFFFFFFFF])

option_data = st.one_of(
    st.binary(max_size=64),
    st.builds(encode_info_request, st.sampled_from(["", "disk", "nope"]),
              st.lists(st.sampled_from(list(Info) + [99]), max_size=4)),
    st.builds(encode_meta_context_request, st.sampled_from(["", "disk"]),
              st.lists(st.sampled_from(["base:allocation", "base:", "qemu:x", ""]),
                       max_size=3)),
)
options = st.just([]) | st.lists(
    st.one_of(
        st.builds(encode_option, st.sampled_from(list(Option)) | u32, option_data),
        # a header whose length disagrees with the data, or is huge
        st.builds(lambda o, n, d: struct.pack(">QII", IHAVEOPT, o, n) + d,
                  st.sampled_from(list(Option)), u32 | st.integers(0, 200),
                  st.binary(max_size=32)),
    ),
    max_size=4)
GO = encode_option(Option.GO, encode_info_request("", []))
# Ways to enter transmission (or not), and whether extended headers are then in use.
enter = st.sampled_from([
    (b"", False),
    (GO, False),
    (encode_option(Option.EXTENDED_HEADERS) + GO, True),
    (encode_option(Option.STRUCTURED_REPLY)
     + encode_option(Option.SET_META_CONTEXT,
                     encode_meta_context_request("", ["base:allocation"])) + GO, False),
    (encode_option(Option.EXTENDED_HEADERS)
     + encode_option(Option.SET_META_CONTEXT,
                     encode_meta_context_request("", ["base:allocation"])) + GO, True),
    (encode_option(Option.EXPORT_NAME, b""), False),
])


@st.composite
def requests(draw, extended: bool):
    """Mostly well-formed requests with edge-case fields, some plain garbage."""
    out = b""
    for _ in range(draw(st.integers(0, 8))):
        good_magic = EXTENDED_REQUEST_MAGIC if extended else REQUEST_MAGIC
        magic = draw(st.sampled_from([good_magic] * 30 + [REQUEST_MAGIC ^ 1, 0]))
        command = draw(st.sampled_from(list(Command) * 4 + [9, 0xFFFF]))
        flags = draw(st.sampled_from([0] * 12 + [1, 2, 4, 8, 16, 3, 0x8000, 0xFFFF]))
        offset = draw(st.integers(0, MiB - 65536).map(lambda n: n - n % 512) | edge_offsets)
        length = draw(st.integers(0, 64 * 1024).map(lambda n: n - n % 512) | edge_lengths)
        if extended:
            out += struct.pack(">IHHQQQ", magic, flags, command, 1, offset, length)
        else:
            out += struct.pack(">IHHQQI", magic, flags, command, 1, offset, length)
        if command == Command.WRITE:
            out += bytes(draw(st.sampled_from([length] * 8 + [0, length // 2])
                              if length <= 65536 else st.integers(0, 2048)))
    return out


@st.composite
def streams(draw):
    flags = draw(st.sampled_from([b"\0\0\0\x03"] * 4 + [b"\0\0\0\x01", b"\0\0\0\x07",
                                                        b"\xff\xff\xff\xff"]))
    go, extended = draw(enter)
    return (flags + b"".join(draw(options)) + go + draw(requests(extended))
            + draw(st.binary(max_size=32)))


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def _attack(data: bytes, chunk: int) -> None:
    # The hostile client gets the default export; the good one its own, so that
    # hostile writes cannot be mistaken for a disturbed good client.
    server = NBDServer([Export("", MemoryBackend(MiB), min_block=512, max_payload=MiB),
                        Export("good", MemoryBackend(MiB))])
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            hostile, hostile_server_side = trio.testing.memory_stream_pair()
            good, good_server_side = trio.testing.memory_stream_pair()
            nursery.start_soon(server.handle_stream, hostile_server_side)
            nursery.start_soon(server.handle_stream, good_server_side)
            client = AsyncClient(good)
            await client.negotiate("good")

            async def drain() -> None:
                try:
                    while await hostile.receive_some(1 << 20):
                        pass
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

            nursery.start_soon(drain)
            # At most 256 pieces: a long stream cut into single bytes would spend the
            # whole time budget on round trips of the good client (slow CI machines).
            chunk = max(chunk, -(-len(data) // 256))
            try:
                for i in range(0, len(data), chunk):
                    await hostile.send_all(data[i:i + chunk])
                    await client.pwrite(b"g" * 512, 0)  # the good client keeps working
                await hostile.send_stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the server hung up on the hostile client: fine
            assert await client.pread(512, 0) == b"g" * 512
            await client.disconnect()


@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=streams(), chunk=st.integers(1, 4096))
def test_hostile_streams_never_crash_the_server(data, chunk):
    errors = _Errors()
    logger = logging.getLogger("blockdrv.server")
    logger.addHandler(errors)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        trio.run(_attack, data, chunk)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
        logger.removeHandler(errors)
    assert not errors.records, [r.getMessage() for r in errors.records]
    assert peak < 40 * MiB  # payloads are capped at the spec's 32 MiB
