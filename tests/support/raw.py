"""A raw NBD client for tests that must see exactly what a server sends.

It builds requests with the protocol layer's encoders and takes the server's bytes apart
one message at a time (option replies, reply chunks) without any of the client's rules
or caps, so a test can check a stream that a real client would reject.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import trio

from blockdrv.protocol.constants import ClientFlag, Option, OptionReply
from blockdrv.protocol.options import (
    OPTION_REPLY_HEADER_SIZE,
    decode_option_reply_header,
    encode_client_flags,
    encode_info_request,
    encode_meta_context_request,
    encode_option,
)
from blockdrv.protocol.wire import (
    EXTENDED_REPLY_SIZE,
    ReplyHeader,
    decode_reply_header,
    encode_request,
    reply_header_size,
)

GREETING_SIZE = 18
CLIENT_FLAGS = encode_client_flags(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)


class OptionReplyMessage(NamedTuple):
    option: int
    type: int
    data: bytes


class Chunk(NamedTuple):
    header: ReplyHeader
    payload: bytes


def handshake_to_go(export: str = "", *, extended: bool = True,
                    contexts: tuple[str, ...] = ("base:allocation",)) -> bytes:
    """What a client sends to enter transmission: flags, options, GO (pipelined)."""
    out = CLIENT_FLAGS
    out += encode_option(Option.EXTENDED_HEADERS if extended else Option.STRUCTURED_REPLY)
    if contexts:
        out += encode_option(Option.SET_META_CONTEXT,
                             encode_meta_context_request(export, contexts))
    return out + encode_option(Option.GO, encode_info_request(export))


class RawClient:
    """Reads a server's stream message by message (see the module docstring)."""

    def __init__(self, stream: trio.abc.ReceiveStream, send: trio.abc.SendStream | None
                 = None) -> None:
        self.stream = stream
        self.sender = send
        self.buffer = bytearray()

    async def send(self, data: bytes) -> None:
        assert self.sender is not None
        await self.sender.send_all(data)

    async def take(self, n: int) -> bytes:
        while len(self.buffer) < n:
            data = await self.stream.receive_some(1 << 16)
            if not data:
                raise EOFError(f"server closed the connection ({len(self.buffer)} of "
                               f"{n} bytes)")
            self.buffer += data
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        return out

    async def option_reply(self) -> OptionReplyMessage:
        option, type_, length = decode_option_reply_header(
            await self.take(OPTION_REPLY_HEADER_SIZE))
        return OptionReplyMessage(option, type_, await self.take(length))

    async def until_ack(self, option: int) -> list[OptionReplyMessage]:
        """Option replies up to and including the ACK of ``option``."""
        replies = []
        while True:
            reply = await self.option_reply()
            replies.append(reply)
            if reply.option == option and reply.type == OptionReply.ACK:
                return replies

    async def enter_transmission(self) -> None:
        """Greeting, then every answer up to GO's ACK (of :func:`handshake_to_go`)."""
        await self.take(GREETING_SIZE)
        await self.until_ack(Option.GO)

    async def chunk(self, *, extended: bool = True) -> Chunk:
        size = EXTENDED_REPLY_SIZE if extended else reply_header_size(
            await self.peek(4), structured=True, extended=False)
        header = decode_reply_header(await self.take(size))
        return Chunk(header, await self.take(header.length))

    async def peek(self, n: int) -> bytes:
        data = await self.take(n)
        self.buffer[:0] = data
        return data


def request(command: int, offset: int, length: int, *, cookie: int = 1, flags: int = 0,
            extended: bool = True) -> bytes:
    """One request header."""
    return encode_request(command, flags, cookie, offset, length, extended=extended)


def info_type(reply: OptionReplyMessage) -> int:
    """The NBD_INFO_* type of an NBD_REP_INFO reply."""
    return int(struct.unpack_from(">H", reply.data)[0])
