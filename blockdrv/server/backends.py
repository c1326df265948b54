"""Storage behind an export: sparse memory, or a (sparse-aware) file.

Both backends answer in *segments*, so the server can send data as OFFSET_DATA chunks and
unallocated ranges as OFFSET_HOLE chunks without materializing zeroes:
``read(offset, length)`` returns ``[(offset, length, views or None), ...]`` where ``None``
is a hole (reads as zeroes) and ``views`` are buffers to send as they are.

- :class:`MemoryBackend` keeps 64 KiB pages in a dict; a missing page is a hole, so
  allocation is exact at page granularity and block status is real.
- :class:`FileBackend` uses ``pread``/``pwrite``, finds holes with SEEK_DATA/SEEK_HOLE,
  punches them with ``fallocate`` (through ctypes: Python's os module has no
  FALLOC_FL_PUNCH_HOLE) and runs its system calls in a worker thread.

Extents from ``block_status`` are ``(length, flags)`` with base:allocation flags.
A backend that knows more metadata contexts (a block node behind
:mod:`blockdrv.server.node_backend`) names them in ``contexts`` and answers them all
from ``context_status``; the default answers base:allocation from ``block_status``.
"""

from __future__ import annotations

import errno
import os
from typing import Protocol, Sequence

import trio

from ..io.files import (
    HOLE_FLAGS,
    data_runs,
    pread_full,
    punch_hole,
    pwrite_all,
    zero_range,
)
from ..protocol.constants import BASE_ALLOCATION, TransmissionFlag

Segment = tuple[int, int, "Sequence[memoryview] | None"]
MAX_EXTENTS = 1024  # per block status reply (the spec lets a server return fewer)
STATUS_SCAN = 1 << 30  # bytes a memory block status looks at (16384 pages)
ZERO_PAGES_PER_CHECKPOINT = 256  # NO_HOLE zeroing yields every 16 MiB
FILE_ZERO_PIECE = 256 << 20  # bytes a file backend zeroes per worker-thread call
ALL_FEATURES = int(TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA
                   | TransmissionFlag.SEND_CACHE | TransmissionFlag.SEND_TRIM
                   | TransmissionFlag.SEND_WRITE_ZEROES)
"""The optional commands a backend serves unless it says otherwise (``features``)."""

Extents = list[tuple[int, int]]  # (length, flags) runs from an offset


class Backend(Protocol):
    """Storage behind an export: what the server's request handlers call."""

    size: int
    fast_zero: bool
    immediate: bool
    """True if no method ever waits (memory): the server then runs requests inline
    instead of in a task each."""
    features: int = ALL_FEATURES
    """Transmission flags of the optional commands served (SEND_FLUSH, SEND_FUA,
    SEND_CACHE, SEND_TRIM, SEND_WRITE_ZEROES) and ROTATIONAL; FAST_ZERO is ``fast_zero``."""
    contexts: Sequence[str] = (BASE_ALLOCATION,)
    """The metadata contexts ``context_status`` answers."""

    async def read(self, offset: int, length: int) -> list[Segment]:
        """Read ``length`` bytes at ``offset`` as data and hole segments."""
        ...

    async def write(self, offset: int, data: bytes | bytearray | memoryview, *,
                    fua: bool = False) -> None:
        """Write ``data`` at ``offset``."""
        ...

    async def zero(self, offset: int, length: int, *, may_trim: bool = True,
                   fast: bool = False, fua: bool = False) -> None:
        """Make a range read as zeroes (punching a hole when allowed)."""
        ...

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Discard a range (reads may return zeroes afterwards)."""
        ...

    async def flush(self) -> None:
        """Make completed writes durable."""
        ...

    async def cache(self, offset: int, length: int) -> None:
        """Prefetch a range (may do nothing)."""
        ...

    async def block_status(self, offset: int, length: int) -> Extents:
        """Allocation runs ``(length, flags)`` from ``offset``, at most ``length`` bytes."""
        ...

    async def context_status(self, offset: int, length: int) -> dict[str, Extents]:
        """Runs of every one of ``contexts`` from ``offset``, by name, each at most
        ``length`` bytes (and possibly fewer, each its own)."""
        return {BASE_ALLOCATION: await self.block_status(offset, length)}

    def close(self) -> None:
        """Release the storage."""
        ...


def merge_extents(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Join neighbouring extents with equal flags."""
    merged: list[tuple[int, int]] = []
    for length, flags in runs:
        if merged and merged[-1][1] == flags:
            merged[-1] = (merged[-1][0] + length, flags)
        else:
            merged.append((length, flags))
    return merged


class MemoryBackend(Backend):
    """A sparse in-memory disk with allocation tracked per 64 KiB page."""

    PAGE = 64 * 1024
    fast_zero = True
    immediate = True  # (a NO_HOLE zero of a huge range checkpoints, which is fine)

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError("size must not be negative")
        self.size = size
        self.pages: dict[int, bytearray] = {}

    def __repr__(self) -> str:
        return f"<MemoryBackend size={self.size} allocated_pages={len(self.pages)}>"

    @property
    def allocated(self) -> int:
        """Bytes currently allocated (not holes)."""
        return len(self.pages) * self.PAGE

    def _spans(self, offset: int, length: int):  # type: ignore[no-untyped-def]
        """(page index, start in page, end in page, absolute offset) over a range."""
        end = offset + length
        page = self.PAGE
        while offset < end:
            index, start = divmod(offset, page)
            stop = min(page, start + end - offset)
            yield index, start, stop, offset
            offset += stop - start

    async def read(self, offset: int, length: int) -> list[Segment]:
        # The server's hottest path: one pass, runs built in locals.
        pages, page = self.pages, self.PAGE
        index, start = divmod(offset, page)
        if start + length <= page:  # within one page (most reads)
            data = pages.get(index)
            if not length:
                return []
            return [(offset, length, None if data is None
                     else [memoryview(data)[start:start + length]])]
        segments: list[Segment] = []
        run_at, run_n = offset, 0
        run_views: list[memoryview] | None = None  # None: the run is a hole
        pos, end = offset, offset + length
        while pos < end:
            index, start = divmod(pos, page)
            n = min(page - start, end - pos)
            data = pages.get(index)
            if data is None:
                if run_views is not None:
                    segments.append((run_at, run_n, run_views))
                    run_at, run_n, run_views = pos, 0, None
            else:
                if run_views is None:
                    if run_n:
                        segments.append((run_at, run_n, None))
                    run_at, run_n, run_views = pos, 0, []
                run_views.append(memoryview(data)[start:start + n])
            run_n += n
            pos += n
        if run_n:
            segments.append((run_at, run_n, run_views))
        return segments

    async def write(self, offset: int, data: bytes | bytearray | memoryview, *,
                    fua: bool = False) -> None:
        view = memoryview(data).cast("B")
        pos = 0
        for index, start, stop, _ in self._spans(offset, len(view)):
            page = self.pages.get(index)
            if page is None:
                page = self.pages[index] = bytearray(self.PAGE)
            page[start:stop] = view[pos:pos + stop - start]
            pos += stop - start

    async def zero(self, offset: int, length: int, *, may_trim: bool = True,
                   fast: bool = False, fua: bool = False) -> None:
        # WRITE_ZEROES and TRIM may cover the whole export: whole pages are dropped by
        # looking at the allocated ones only, so a huge range costs what it frees.
        page = self.PAGE
        first, last = -(-offset // page), (offset + length) // page  # whole pages
        if not may_trim or first >= last:
            await self._zero_pages(offset, length, may_trim)
            return
        await self._zero_pages(offset, first * page - offset, may_trim)
        for index in self._allocated_in(first, last):
            del self.pages[index]
        await self._zero_pages(last * page, offset + length - last * page, may_trim)

    async def _zero_pages(self, offset: int, length: int, may_trim: bool) -> None:
        for n, (index, start, stop, _) in enumerate(self._spans(offset, length)):
            if n % ZERO_PAGES_PER_CHECKPOINT == ZERO_PAGES_PER_CHECKPOINT - 1:
                await trio.lowlevel.checkpoint()  # NO_HOLE over a large export
            page = self.pages.get(index)
            if start == 0 and stop == self.PAGE and may_trim:
                self.pages.pop(index, None)
            elif page is not None:
                page[start:stop] = bytes(stop - start)
            elif not may_trim:  # NO_HOLE: the range must end up allocated
                self.pages[index] = bytearray(self.PAGE)

    def _allocated_in(self, first: int, last: int) -> list[int]:
        """Allocated page indices in ``[first, last)``, at the cost of the smaller set."""
        if last - first > len(self.pages):
            return [index for index in self.pages if first <= index < last]
        return [index for index in range(first, last) if index in self.pages]

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self.zero(offset, length, may_trim=True)

    async def flush(self) -> None:
        pass

    async def cache(self, offset: int, length: int) -> None:
        pass

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        # Looks at no more than STATUS_SCAN bytes: a reply may describe less than asked.
        length = min(length, STATUS_SCAN)
        runs = [(stop - start, 0 if index in self.pages else HOLE_FLAGS)
                for index, start, stop, _ in self._spans(offset, length)]
        return merge_extents(runs)[:MAX_EXTENTS]

    def close(self) -> None:
        self.pages.clear()


# --- files ----------------------------------------------------------------------------

class FileBackend(Backend):
    """A file (or block device) with holes found by SEEK_DATA/SEEK_HOLE."""

    immediate = False  # system calls run in worker threads

    def __init__(self, path: str | os.PathLike[str], *, size: int | None = None,
                 read_only: bool = False, create: bool = False) -> None:
        flags = os.O_RDONLY if read_only else os.O_RDWR
        if create:
            flags |= os.O_CREAT
        self.path = os.fspath(path)
        self.fd = os.open(self.path, flags | os.O_CLOEXEC, 0o644)
        if size is not None and not read_only and os.fstat(self.fd).st_size != size:
            os.ftruncate(self.fd, size)
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        self.fast_zero = self._probe_punch()

    def __repr__(self) -> str:
        return f"<FileBackend {self.path!r} size={self.size}>"

    def _probe_punch(self) -> bool:
        """True if this filesystem can punch holes (so zeroing is fast)."""
        try:  # punching one byte past the end changes nothing
            punch_hole(self.fd, self.size, 1)
        except OSError:
            return False
        return True

    def _read_sync(self, offset: int, length: int) -> list[Segment]:
        segments: list[Segment] = []
        for at, n, is_data in data_runs(self.fd, offset, length):
            if not is_data:
                segments.append((at, n, None))
                continue
            view = memoryview(bytearray(n))
            pread_full(self.fd, view, at)  # what is missing reads as zeroes
            segments.append((at, n, [view]))
        return segments

    async def read(self, offset: int, length: int) -> list[Segment]:
        return await trio.to_thread.run_sync(self._read_sync, offset, length)

    def _write_sync(self, offset: int, data: memoryview, fua: bool) -> None:
        pwrite_all(self.fd, data, offset)
        if fua:
            os.fdatasync(self.fd)

    async def write(self, offset: int, data: bytes | bytearray | memoryview, *,
                    fua: bool = False) -> None:
        await trio.to_thread.run_sync(self._write_sync, offset,
                                      memoryview(data).cast("B"), fua)

    def _zero_sync(self, offset: int, length: int, may_trim: bool, fast: bool,
                   fua: bool) -> None:
        zero_range(self.fd, offset, length, may_trim=may_trim, fast=fast)
        if fua:
            os.fdatasync(self.fd)

    async def zero(self, offset: int, length: int, *, may_trim: bool = True,
                   fast: bool = False, fua: bool = False) -> None:
        # A piece per worker-thread call: zeroing may mean writing zeroes, and a huge
        # range must stay cancellable (graceful shutdown is bounded).
        end = offset + length
        for pos in range(offset, end, FILE_ZERO_PIECE):
            piece = min(FILE_ZERO_PIECE, end - pos)
            await trio.to_thread.run_sync(self._zero_sync, pos, piece, may_trim, fast,
                                          fua and pos + piece == end)

    def _trim_sync(self, offset: int, length: int, fua: bool) -> None:
        try:
            punch_hole(self.fd, offset, length)
        except OSError as exc:  # trim is only a hint
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
        if fua:
            os.fdatasync(self.fd)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await trio.to_thread.run_sync(self._trim_sync, offset, length, fua)

    async def flush(self) -> None:
        await trio.to_thread.run_sync(os.fdatasync, self.fd)

    async def cache(self, offset: int, length: int) -> None:
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    def _status_sync(self, offset: int, length: int) -> list[tuple[int, int]]:
        runs = [(n, 0 if is_data else HOLE_FLAGS) for _, n, is_data in
                data_runs(self.fd, offset, length, MAX_EXTENTS)]
        return merge_extents(runs)[:MAX_EXTENTS]

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        return await trio.to_thread.run_sync(self._status_sync, offset, length)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
