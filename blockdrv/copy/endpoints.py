"""The two ends of ``blockdrv copy``: an NBD export, a local file, ``null:`` or ``-``.

Every endpoint offers what the copy needs, in the same units as a block node: ``size``,
``block_status`` (base:allocation extents, so ``map_extents`` walks it as it walks a
node), reading into a buffer, writing, writing zeroes (``allocate``: keep the range
allocated instead of punching a hole), ``flush`` and ``known_zero`` (the destination
already reads as zeroes everywhere, so holes need no request at all).
Local files go through the embedded server's file functions (``data_runs`` from
SEEK_DATA/SEEK_HOLE, ``pread_full``, ``pwrite_all``, ``zero_range``) in trio's worker
threads.  A local destination file is created or truncated and grown to the source's
size, so it starts sparse and all zeroes.  ``-`` is standard input (as the source) or
standard output (as the destination): a stream, read or written strictly in order
(``sequential``); standard input's size is not known until its end.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
from contextlib import asynccontextmanager
from typing import AsyncIterator

import trio

from ..block.node import Extent
from ..io.files import HOLE_FLAGS, data_runs, pread_full, pwrite_all, zero_range
from ..nbd import Device
from ..nbd.opening import ClientOptions, open_device
from ..protocol.constants import BASE_ALLOCATION
from ..protocol.uri import is_nbd_uri


class Endpoint:
    """One end of a copy (see the module docstring)."""

    name = ""
    size = 0
    known_zero = False  # reads as zeroes everywhere before the copy writes anything
    sequential = False  # a stream: bytes go (or come) strictly in order
    identity: tuple[int, int] | None = None  # (device, inode) of a local file

    @property
    def reconnects(self) -> int:
        """How often the connection behind this endpoint was made again."""
        return 0

    async def block_status(self, count: int, offset: int, *,
                           context: str = BASE_ALLOCATION) -> list[Extent]:
        """Allocation of ``offset .. offset + count`` (everything data if unknown)."""
        return [Extent(offset, count, 0)]

    async def read(self, buf: memoryview, offset: int) -> None:
        """Read ``len(buf)`` bytes at ``offset`` into ``buf``."""
        raise NotImplementedError

    async def write(self, buf: memoryview, offset: int) -> None:
        """Write ``buf`` at ``offset``."""
        raise NotImplementedError

    async def zero(self, count: int, offset: int, *, allocate: bool = False) -> None:
        """Make ``count`` bytes at ``offset`` read as zeroes (``allocate``: and keep
        them allocated)."""
        raise NotImplementedError

    async def flush(self) -> None:
        """Make what was written durable."""
        pass

    async def extend(self, size: int) -> None:
        """Make the destination at least ``size`` bytes long, where it can grow (a
        file written from a stream of unknown size)."""
        pass


class NBDEndpoint(Endpoint):
    def __init__(self, name: str, device: Device) -> None:
        self.name, self.device = name, device
        self.size = device.size
        self._zero_buf = b""

    async def block_status(self, count: int, offset: int, *,
                           context: str = BASE_ALLOCATION) -> list[Extent]:
        if not self.device.info.can_block_status:
            return await super().block_status(count, offset)
        return await self.device.block_status(count, offset, context=context)

    async def read(self, buf: memoryview, offset: int) -> None:
        await self.device.pread_into(buf, offset)

    async def write(self, buf: memoryview, offset: int) -> None:
        await self.device.pwrite(buf, offset)

    @property
    def reconnects(self) -> int:
        return self.device.statistics().reconnects

    async def zero(self, count: int, offset: int, *, allocate: bool = False) -> None:
        if self.device.info.can_zero:
            await self.device.zero(count, offset, may_trim=not allocate)
            return
        if len(self._zero_buf) < count:
            self._zero_buf = bytes(count)
        await self.device.pwrite(memoryview(self._zero_buf)[:count], offset)

    async def flush(self) -> None:
        if self.device.info.can_flush:
            await self.device.flush()


class FileEndpoint(Endpoint):
    def __init__(self, name: str, fd: int, size: int, *, known_zero: bool) -> None:
        self.name, self.fd, self.size, self.known_zero = name, fd, size, known_zero

    async def block_status(self, count: int, offset: int, *,
                           context: str = BASE_ALLOCATION) -> list[Extent]:
        runs = await trio.to_thread.run_sync(data_runs, self.fd, offset, count)
        return [Extent(at, n, 0 if is_data else HOLE_FLAGS) for at, n, is_data in runs]

    async def read(self, buf: memoryview, offset: int) -> None:
        got = await trio.to_thread.run_sync(pread_full, self.fd, buf, offset)
        if got < len(buf):  # a file shorter than it was: the rest reads as zeroes
            buf[got:] = bytes(len(buf) - got)

    async def write(self, buf: memoryview, offset: int) -> None:
        try:
            await trio.to_thread.run_sync(pwrite_all, self.fd, buf, offset)
        except OSError as exc:
            raise OSError(exc.errno, f"{self.name}: {exc.strerror}") from None

    async def zero(self, count: int, offset: int, *, allocate: bool = False) -> None:
        await trio.to_thread.run_sync(
            functools.partial(zero_range, self.fd, offset, count, may_trim=not allocate))

    async def flush(self) -> None:
        await trio.to_thread.run_sync(os.fsync, self.fd)

    async def extend(self, size: int) -> None:
        if os.fstat(self.fd).st_size < size:
            os.ftruncate(self.fd, size)


class NullEndpoint(Endpoint):
    """``null:``: a destination that discards everything (for read benchmarks)."""

    name = "null:"
    known_zero = True

    async def write(self, buf: memoryview, offset: int) -> None:
        pass

    async def zero(self, count: int, offset: int, *, allocate: bool = False) -> None:
        pass


class StreamEndpoint(Endpoint):
    """``-``: standard input as a source, standard output as a destination.

    Reads and writes run in worker threads on a duplicate of the descriptor (left
    blocking: the descriptor is shared with whoever else holds the pipe or terminal).
    A destination takes bytes strictly in order; zeroes are written out as zeroes.
    """

    sequential = True

    def __init__(self, fd: int, name: str, size: int = 0) -> None:
        self.fd, self.name, self.size = fd, name, size
        self.position = 0
        self._zeroes = memoryview(b"")

    async def read_some(self, buf: memoryview) -> int:
        """Fill ``buf`` from the stream; fewer bytes only at its end (0: the end)."""
        got = 0
        while got < len(buf):
            n = await trio.to_thread.run_sync(os.readv, self.fd, [buf[got:]],
                                              abandon_on_cancel=True)
            if n == 0:
                break
            got += n
        self.position += got
        return got

    async def write(self, buf: memoryview, offset: int) -> None:
        if offset != self.position:
            raise ValueError(f"{self.name}: out-of-order write at {offset} "
                             f"(the stream is at {self.position})")
        await trio.to_thread.run_sync(_write_all, self.fd, buf, self.name)
        self.position += len(buf)

    async def zero(self, count: int, offset: int, *, allocate: bool = False) -> None:
        if len(self._zeroes) < min(count, ZERO_CHUNK):
            self._zeroes = memoryview(bytes(min(count, ZERO_CHUNK)))
        for at in range(offset, offset + count, len(self._zeroes)):
            await self.write(self._zeroes[:min(len(self._zeroes), offset + count - at)], at)


ZERO_CHUNK = 1 << 20  # zeroes written to a stream per write


def _write_all(fd: int, data: memoryview, name: str) -> None:
    while data:
        try:
            n = os.write(fd, data)
        except OSError as exc:
            raise OSError(exc.errno, f"{name}: {exc.strerror}") from None
        data = data[n:]


GROWS = (1 << 63) - 1
"""The size of a destination that grows as it is written (a file, ``null:``) when the
source's size is not known (standard input)."""


@asynccontextmanager
async def open_endpoint(spec: str, *, destination: bool, size: int | None = 0,
                        connections: int = 1, requests: int = 16,
                        source: Endpoint | None = None,
                        options: ClientOptions | None = None) -> AsyncIterator[Endpoint]:
    """Open ``spec`` (an NBD URI, ``null:``, ``-`` or a local file) as a copy endpoint.

    A destination regular file is created or truncated and given ``size`` bytes (other
    destinations, e.g. block devices, are written in place; ``size=None``: not known
    yet, the file grows as it is written); a destination that is the ``source`` file
    itself is refused.  NBD exports are opened with ``options`` (reconnect delay and
    timeouts).  Errors are OSError/ValueError with a one-line message.
    """
    if spec == "-":
        fd = os.dup(1 if destination else 0)
        try:
            yield StreamEndpoint(fd, "standard output" if destination else "standard input",
                                 size or 0)
        finally:
            os.close(fd)
    elif spec == "null:":
        if not destination:
            raise ValueError("null: can only be the destination of a copy")
        null = NullEndpoint()
        null.size = GROWS if size is None else size
        yield null
    elif is_nbd_uri(spec):
        async with open_device(spec, options or ClientOptions(), connections=connections,
                               max_in_flight=requests) as dev:
            if destination and dev.info.is_read_only:
                raise OSError(errno.EROFS, f"{spec}: the export is read-only")
            yield NBDEndpoint(spec, dev)
    else:
        flags = os.O_RDWR | os.O_CREAT if destination else os.O_RDONLY
        try:
            fd = os.open(spec, flags | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise OSError(exc.errno, f"{spec}: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            identity = (info.st_dev, info.st_ino)
            if source is not None and identity == source.identity:
                raise ValueError(f"{spec} is the source of this copy as well")
            regular = stat.S_ISREG(info.st_mode)
            if destination and regular:  # a new, sparse, all-zero file of the right size
                if info.st_size:
                    # Only when there is something to drop: after a truncation to 0,
                    # ext4 (auto_da_alloc) writes the whole file out when it is closed.
                    os.ftruncate(fd, 0)
                os.ftruncate(fd, size or 0)
            # st_size is 0 for block devices: ask where the end is
            length = os.lseek(fd, 0, os.SEEK_END)
            if destination and regular and size is None:
                length = GROWS
            endpoint = FileEndpoint(spec, fd, length, known_zero=destination and regular)
            endpoint.identity = identity
            yield endpoint
        finally:
            os.close(fd)
