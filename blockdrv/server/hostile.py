"""The bytes a hostile mode of the embedded server sends: floods of option replies or
chunks, a reply trickled a few bytes at a time, malformed chunks.  Each is a generator
or a pure function of the request; :mod:`blockdrv.server.faults` decides when a mode
fires, and the connection sends what these produce (a flood in batches, checkpointing
between them).
"""

from __future__ import annotations

import errno as _errno
import itertools
import random
from typing import Iterable, Iterator

from ..protocol.constants import (
    ChunkType,
    Command,
    Info,
    Option,
    OptionReply,
    errno_to_wire,
)
from ..protocol.options import (
    encode_info_string,
    encode_option_reply,
    encode_rep_meta_context,
    encode_rep_server,
)
from ..protocol.wire import (
    Request,
    encode_block_status_chunk,
    encode_chunk_header,
    encode_error_chunk,
)


def flood_option_replies(option: int, export: str, first_id: int) -> Iterator[bytes]:
    """The endless answer to an option (one of FLOOD_OPTIONS), reply after reply."""
    for i in itertools.count():
        if option in (Option.GO, Option.INFO):
            if i % 2:  # an info type nobody defined, which clients must ignore
                data = (0x4000 + i % 0x4000).to_bytes(2, "big") + i.to_bytes(8, "big")
            else:
                data = encode_info_string(Info.NAME, export)
            yield encode_option_reply(option, OptionReply.INFO, data)
        elif option == Option.LIST:
            yield encode_option_reply(option, OptionReply.SERVER,
                                      encode_rep_server(f"flood-{i}"))
        else:
            context_id = first_id + i if option == Option.SET_META_CONTEXT else 0
            yield encode_option_reply(option, OptionReply.META_CONTEXT,
                                      encode_rep_meta_context(context_id, f"qemu:flood-{i}"))


def flood_chunks(request: Request, *, extended: bool, context_id: int) -> Iterator[bytes]:
    """The endless reply to a READ (error chunks) or BLOCK_STATUS (status chunks), never
    flagged DONE."""
    eio = errno_to_wire(_errno.EIO)
    for i in itertools.count():
        if request.command == Command.READ:
            yield encode_error_chunk(request.cookie, eio, f"flood {i}", done=False,
                                     extended=extended)
        else:
            yield encode_block_status_chunk(request.cookie, context_id,
                                            [(max(request.length, 1), 0)], done=False,
                                            extended=extended)


def trickle(buffers: Iterable[bytes | bytearray | memoryview], max_piece: int,
            rng: random.Random) -> Iterator[memoryview]:
    """The bytes of ``buffers`` in pieces of 1 to ``max_piece`` bytes (slowloris)."""
    for buffer in buffers:
        view = memoryview(buffer).cast("B")
        pos = 0
        while pos < len(view):
            n = rng.randint(1, max_piece)
            yield view[pos:pos + n]
            pos += n


def malform(chunks: list[list[bytes | bytearray | memoryview]], kind: str, cookie: int,
            extended: bool) -> list[list[bytes | bytearray | memoryview]]:
    """A reply's chunks with the first one's header corrupted as ``kind`` (one of
    MALFORMED_KINDS) says."""
    first = bytearray(chunks[0][0])
    if kind == "bad-magic":
        first[0:4] = b"\xde\xad\xbe\xef"
    elif kind == "unknown-cookie":  # the cookie sits at byte 8 in every reply header
        first[8:16] = (cookie ^ 0x5A5A_0000_0000_0000).to_bytes(8, "big")
    else:  # oversized-length: a chunk claiming far more payload than any cap allows
        return [[encode_chunk_header(cookie, ChunkType.OFFSET_DATA, 0xFFFFFFF0, done=True,
                                     extended=extended)]]
    return [[bytes(first), *chunks[0][1:]], *chunks[1:]]

