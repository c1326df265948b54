"""Floods: endless streams of NBD messages, poured into a socket by a child process.

Theory of operation
-------------------
A peer that keeps sending tests a client only if the client never finds its socket
empty: then no ``recv`` ever waits, and only the client's own checkpoints let deadlines,
cancellation and other tasks in.  A writer thread inside the client's process cannot
promise that: it needs the GIL the client's parsing loop holds, so it falls behind, the
socket runs dry, the client's ``recv`` waits (a checkpoint), and a missing checkpoint
goes unnoticed.  So the proxy pours from a child process (``python -m
blockdrv.fuzz.flood``), as a server on another machine would: it inherits the client's
socket and writes the same block of messages again and again (for meta contexts, blocks
of new distinct contexts, since a repeated one is kept once) until ``limit`` bytes went
out or the client hung up.  The proxy stops it by cancelling :func:`pour`, which kills
the child.

A flood is named by a :class:`FloodSpec`: ``kind`` is ``error-chunks`` (structured error
chunks, never DONE, for the request with cookie ``value``), ``info``, ``list`` or
``contexts`` (option replies to the option ``value``).
"""

from __future__ import annotations

import errno
import itertools
import os
import select
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Iterator

import trio

from ..protocol.constants import Info, Option, OptionReply
from ..protocol.options import (
    encode_info_string,
    encode_option_reply,
    encode_rep_meta_context,
    encode_rep_server,
)
from ..protocol.wire import encode_error_chunk

BLOCK_BYTES = 1 << 20  # written per os.write, at most


@dataclass(frozen=True)
class FloodSpec:
    kind: str  # "error-chunks", "info", "list" or "contexts"
    value: int  # the cookie (error-chunks) or the option (the others)
    extended: bool = False

    def blocks(self) -> Iterator[bytes]:
        """The stream, a block at a time, endless."""
        if self.kind == "contexts":
            numbers = itertools.count(1)
            while True:
                yield b"".join(encode_option_reply(self.value, OptionReply.META_CONTEXT,
                                                   encode_rep_meta_context(n, f"flood:{n}"))
                               for n in itertools.islice(numbers, 8192))
        message = self._message()
        block = message * max(1, BLOCK_BYTES // len(message))
        while True:
            yield block

    def _message(self) -> bytes:
        if self.kind == "error-chunks":
            return encode_error_chunk(self.value, errno.EIO, "flood", done=False,
                                      extended=self.extended)
        if self.kind == "info":
            return encode_option_reply(self.value, OptionReply.INFO,
                                       encode_info_string(Info.NAME, "flood"))
        if self.kind == "list":
            return encode_option_reply(self.value, OptionReply.SERVER,
                                       encode_rep_server("x" * 64, "y" * 64))
        raise ValueError(f"unknown flood kind {self.kind!r}")


# What answers each handshake option with a flood.
HANDSHAKE_FLOODS: dict[int, Callable[[int], FloodSpec]] = {
    Option.GO: lambda o: FloodSpec("info", o), Option.INFO: lambda o: FloodSpec("info", o),
    Option.LIST: lambda o: FloodSpec("list", o),
    Option.LIST_META_CONTEXT: lambda o: FloodSpec("contexts", o),
    Option.SET_META_CONTEXT: lambda o: FloodSpec("contexts", o),
}


async def pour(fd: int, spec: FloodSpec, limit: int) -> None:
    """Flood the socket ``fd`` from a child process until ``limit`` bytes went out or the
    peer is gone; cancelling this kills the child."""
    command = [sys.executable, "-m", "blockdrv.fuzz.flood", str(fd), spec.kind,
               str(spec.value), str(int(spec.extended)), str(limit)]
    await trio.run_process(command, pass_fds=(fd,), check=False,
                           stdin=subprocess.DEVNULL)


def _write_all(fd: int, blocks: Iterator[bytes], limit: int) -> int:
    # The socket stays non-blocking: its file description is shared with the proxy.
    sent = 0
    view = memoryview(next(blocks))
    while sent < limit:
        select.select([], [fd], [])
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            continue
        except OSError:
            break  # the client went away
        sent += n
        view = view[n:] if n < len(view) else memoryview(next(blocks))
    return sent


def main(argv: list[str]) -> int:
    fd, kind, value, extended, limit = argv
    spec = FloodSpec(kind, int(value), bool(int(extended)))
    _write_all(int(fd), spec.blocks(), int(limit))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
