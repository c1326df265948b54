"""A scripted, misbehaving NBD server in a thread, on a private Unix socket.

It speaks just enough NBD to get a client to the point under test and then does what
the test says: floods option replies or reply chunks at full speed (from another thread,
so the client always has data to read, which is what a fast hostile peer looks like to
a trio program), offers contexts nobody asked for, splits READ replies into tiny chunks
in any order, or repeats an old reply later.  It never holds more than one message in
memory: floods are one pre-built block sent again and again until the client goes away.

Use it as a context manager; :attr:`HostileServer.uri` is where it listens.  Each
connection is served by the thread that accepted it; leaving the ``with`` closes the
listener and every connection and joins the threads.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from blockdrv.protocol import wire
from blockdrv.protocol.constants import (
    Command,
    HandshakeFlag,
    Info,
    Option,
    OptionReply,
    TransmissionFlag,
)
from blockdrv.protocol.options import (
    encode_greeting,
    encode_info_export,
    encode_info_string,
    encode_option_reply,
    encode_rep_meta_context,
    encode_rep_server,
)

FLAGS = (TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA
         | TransmissionFlag.SEND_WRITE_ZEROES | TransmissionFlag.SEND_TRIM
         | TransmissionFlag.SEND_DF)
_REQUEST = struct.Struct(">IHHQQI")

Replier = Callable[["Connection", wire.Request], Iterator[bytes]]
"""How a request is answered: yields the bytes to send, piece by piece (endless for a
flood).  The default answers like a zero-filled disk that accepts every write."""


@dataclass
class Script:
    """What the server does; everything not set behaves like a plain server."""

    size: int = 1 << 20
    structured: bool = True
    flood_info: bool = False  # GO: NBD_REP_INFO forever
    flood_list: bool = False  # LIST: NBD_REP_SERVER forever
    flood_contexts: bool = False  # LIST/SET_META_CONTEXT: NBD_REP_META_CONTEXT forever
    extra_context: str | None = None  # SET_META_CONTEXT: also offer this one
    reply: Replier | None = None
    requests: list[wire.Request] = field(default_factory=list)  # what arrived


class Connection:
    """One client's socket, with the helpers a Replier needs."""

    def __init__(self, sock: socket.socket, script: Script) -> None:
        self.sock = sock
        self.script = script
        self.replies_sent: list[bytes] = []  # every whole reply sent, in order

    def recv_exactly(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            piece = self.sock.recv(n - len(data))
            if not piece:
                raise ConnectionError("client went away")
            data += piece
        return bytes(data)


def repeat(block: bytes, *, size: int = 1 << 16) -> Iterator[bytes]:
    """``block`` over and over, in pieces of about ``size`` bytes, forever."""
    piece = block * max(1, size // len(block))
    while True:
        yield piece


def plain_reply(conn: Connection, request: wire.Request) -> Iterator[bytes]:
    """A zero-filled disk: READ returns zeroes (one data chunk), everything else OK."""
    if request.command == Command.READ:
        data = bytes(request.length)
        if conn.script.structured:
            yield wire.encode_data_chunk_header(request.cookie, request.offset, len(data),
                                                done=True) + data
        else:
            yield wire.encode_simple_reply(request.cookie) + data
    elif conn.script.structured:
        yield wire.encode_none_chunk(request.cookie)
    else:
        yield wire.encode_simple_reply(request.cookie)


class HostileServer:
    """See the module docstring."""

    def __init__(self, directory: Path, script: Script) -> None:
        self.path = str(directory / "hostile.sock")
        self.script = script
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._threads: list[threading.Thread] = []
        self._connections: list[socket.socket] = []
        self._stopping = False

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.path}"

    def __enter__(self) -> HostileServer:
        self._listener.bind(self.path)
        self._listener.listen(16)
        self._start(self._accept_loop)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping = True
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for sock in list(self._connections):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(10)
        for sock in self._connections:
            sock.close()
        if os.path.exists(self.path):
            os.unlink(self.path)

    def _start(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            self._connections.append(sock)
            self._start(self._serve, sock)

    def _serve(self, sock: socket.socket) -> None:
        conn = Connection(sock, self.script)
        try:
            if self._handshake(conn):
                self._transmission(conn)
        except OSError:
            pass  # the client went away: a flood ends here

    # --- handshake --------------------------------------------------------------------

    def _send_all(self, conn: Connection, pieces: Iterator[bytes]) -> None:
        for piece in pieces:
            if self._stopping:
                raise ConnectionError("stopping")
            conn.sock.sendall(piece)

    def _handshake(self, conn: Connection) -> bool:
        script = self.script
        conn.sock.sendall(encode_greeting(HandshakeFlag.FIXED_NEWSTYLE
                                          | HandshakeFlag.NO_ZEROES))
        conn.recv_exactly(4)
        while True:
            _, option, length = struct.unpack(">QII", conn.recv_exactly(16))
            data = conn.recv_exactly(length)
            reply = encode_option_reply
            if option == Option.ABORT:
                conn.sock.sendall(reply(option, OptionReply.ACK))
                return False
            if option == Option.STRUCTURED_REPLY and script.structured:
                conn.sock.sendall(reply(option, OptionReply.ACK))
            elif option == Option.LIST and script.flood_list:
                self._send_all(conn, repeat(reply(option, OptionReply.SERVER,
                                                  encode_rep_server("x" * 64, "y" * 64))))
            elif option in (Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT):
                if script.flood_contexts:
                    self._send_all(conn, _context_flood(option))
                names = _queries(data)
                if script.extra_context is not None:
                    names.append(script.extra_context)
                for number, name in enumerate(names, 1):
                    conn.sock.sendall(reply(option, OptionReply.META_CONTEXT,
                                            encode_rep_meta_context(number, name)))
                conn.sock.sendall(reply(option, OptionReply.ACK))
            elif option == Option.GO:
                if script.flood_info:
                    self._send_all(conn, repeat(reply(option, OptionReply.INFO,
                                                      encode_info_string(Info.NAME, "x"))))
                conn.sock.sendall(reply(option, OptionReply.INFO,
                                        encode_info_export(script.size, FLAGS))
                                  + reply(option, OptionReply.ACK))
                return True
            else:
                conn.sock.sendall(reply(option, OptionReply.ERR_UNSUP))

    # --- transmission -----------------------------------------------------------------

    def _transmission(self, conn: Connection) -> None:
        replier = self.script.reply or plain_reply
        while True:
            _, flags, command, cookie, offset, length = _REQUEST.unpack(
                conn.recv_exactly(_REQUEST.size))
            if command == Command.DISC:
                return
            if command == Command.WRITE:
                conn.recv_exactly(length)
            request = wire.Request(flags, command, cookie, offset, length)
            self.script.requests.append(request)
            whole = bytearray()
            for piece in replier(conn, request):
                if len(whole) < (1 << 20):
                    whole += piece
                conn.sock.sendall(piece)
            conn.replies_sent.append(bytes(whole))


def _queries(data: bytes) -> list[str]:
    (name_length,) = struct.unpack_from(">I", data)
    pos = 4 + name_length
    (count,) = struct.unpack_from(">I", data, pos)
    pos += 4
    names = []
    for _ in range(count):
        (n,) = struct.unpack_from(">I", data, pos)
        names.append(data[pos + 4:pos + 4 + n].decode())
        pos += 4 + n
    return names


def _context_flood(option: int) -> Iterator[bytes]:
    """Distinct contexts, forever, a block at a time."""
    number = 0
    while True:
        block = bytearray()
        for _ in range(1024):
            number += 1
            block += encode_option_reply(option, OptionReply.META_CONTEXT,
                                         encode_rep_meta_context(number, f"x:{number}"))
        yield bytes(block)
