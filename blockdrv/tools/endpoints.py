"""The two ends of ``blockdrv copy``: an NBD export, a local file, or ``null:``.

Every endpoint offers what the copy needs, in the same units as a block node: ``size``,
``extents`` (allocation as base:allocation flags: 1 hole, 2 reads as zeroes), reading
into a buffer, writing, writing zeroes, ``flush`` and ``known_zero`` (the destination
already reads as zeroes everywhere, so holes need no request at all).  Local files are
read and written in trio's worker threads (``os.preadv``/``os.pwrite``); their
allocation comes from SEEK_DATA/SEEK_HOLE.  A local destination file is created or
truncated and grown to the source's size, so it starts sparse and all zeroes.
"""

from __future__ import annotations

import errno
import os
import stat
from contextlib import asynccontextmanager
from typing import AsyncIterator

import trio

from ..nbd import Device, open_nbd
from ..node import Extent
from ..protocol.constants import BASE_ALLOCATION

HOLE, ZERO = 1, 2


class Endpoint:
    """One end of a copy (see the module docstring)."""

    name = ""
    size = 0
    known_zero = False  # reads as zeroes everywhere before the copy writes anything
    connections = 1
    identity: tuple[int, int] | None = None  # (device, inode) of a local file

    async def extents(self, count: int, offset: int) -> list[Extent]:
        """Allocation of ``offset .. offset + count`` (everything data if unknown)."""
        return [Extent(offset, count, 0)]

    async def read(self, buf: memoryview, offset: int) -> None:
        """Read ``len(buf)`` bytes at ``offset`` into ``buf``."""
        raise NotImplementedError

    async def write(self, buf: memoryview, offset: int) -> None:
        """Write ``buf`` at ``offset``."""
        raise NotImplementedError

    async def zero(self, count: int, offset: int) -> None:
        """Make ``count`` bytes at ``offset`` read as zeroes."""
        raise NotImplementedError

    async def flush(self) -> None:
        """Make what was written durable."""
        pass


class NBDEndpoint(Endpoint):
    def __init__(self, name: str, device: Device) -> None:
        self.name, self.device = name, device
        self.size = device.size
        self.connections = device.connections
        self._zero_buf = b""

    async def extents(self, count: int, offset: int) -> list[Extent]:
        if not self.device.info.can_block_status:
            return await super().extents(count, offset)
        return await self.device.block_status(count, offset, context=BASE_ALLOCATION)

    async def read(self, buf: memoryview, offset: int) -> None:
        await self.device.pread_into(buf, offset)

    async def write(self, buf: memoryview, offset: int) -> None:
        await self.device.pwrite(buf, offset)

    async def zero(self, count: int, offset: int) -> None:
        if self.device.info.can_zero:
            await self.device.zero(count, offset, may_trim=True)
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

    async def extents(self, count: int, offset: int) -> list[Extent]:
        return await trio.to_thread.run_sync(self._seek_extents, count, offset)

    def _seek_extents(self, count: int, offset: int) -> list[Extent]:
        end = offset + count
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after offset: all hole
                return [Extent(offset, count, HOLE | ZERO)]
            return [Extent(offset, count, 0)]  # no SEEK_DATA here: say data
        if data > offset:
            return [Extent(offset, min(data, end) - offset, HOLE | ZERO)]
        hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        return [Extent(offset, min(hole, end) - offset, 0)]

    async def read(self, buf: memoryview, offset: int) -> None:
        got = await trio.to_thread.run_sync(os.preadv, self.fd, [buf], offset)
        if got < len(buf):  # a file shorter than it was: the rest reads as zeroes
            buf[got:] = bytes(len(buf) - got)

    async def write(self, buf: memoryview, offset: int) -> None:
        await trio.to_thread.run_sync(self._write_all, buf, offset)

    def _write_all(self, buf: memoryview, offset: int) -> None:
        while buf:  # pwrite may write less than asked (a full disk, some filesystems)
            done = os.pwrite(self.fd, buf, offset)
            if done <= 0:
                raise OSError(errno.EIO, f"{self.name}: short write at {offset}")
            buf, offset = buf[done:], offset + done

    async def zero(self, count: int, offset: int) -> None:
        if not self.known_zero:
            await self.write(memoryview(bytes(count)), offset)

    async def flush(self) -> None:
        await trio.to_thread.run_sync(os.fsync, self.fd)


class NullEndpoint(Endpoint):
    """``null:``: a destination that discards everything (for read benchmarks)."""

    name = "null:"
    known_zero = True

    async def write(self, buf: memoryview, offset: int) -> None:
        pass

    async def zero(self, count: int, offset: int) -> None:
        pass


def is_nbd_uri(spec: str) -> bool:
    return spec.split(":", 1)[0] in ("nbd", "nbds", "nbd+unix", "nbds+unix", "nbd+tcp",
                                     "nbds+tcp")


@asynccontextmanager
async def open_endpoint(spec: str, *, destination: bool, size: int = 0,
                        connections: int = 1, requests: int = 16,
                        source: Endpoint | None = None) -> AsyncIterator[Endpoint]:
    """Open ``spec`` (an NBD URI, ``null:`` or a local file) as a copy endpoint.

    A destination regular file is created or truncated and given ``size`` bytes (other
    destinations, e.g. block devices, are written in place); a destination that is the
    ``source`` file itself is refused.  Errors are OSError/ValueError with a one-line
    message.
    """
    if spec == "null:":
        if not destination:
            raise ValueError("null: can only be the destination of a copy")
        null = NullEndpoint()
        null.size = size
        yield null
    elif is_nbd_uri(spec):
        async with open_nbd(spec, connections=connections, max_in_flight=requests) as dev:
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
                os.ftruncate(fd, 0)
                os.ftruncate(fd, size)
            # st_size is 0 for block devices: ask where the end is
            length = os.lseek(fd, 0, os.SEEK_END) if not regular else os.fstat(fd).st_size
            endpoint = FileEndpoint(spec, fd, length, known_zero=destination and regular)
            endpoint.identity = identity
            yield endpoint
        finally:
            os.close(fd)
