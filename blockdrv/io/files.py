"""Blocking file I/O for sparse files: holes by SEEK_DATA/SEEK_HOLE, punching and zeroing
by fallocate(2) (through ctypes: Python's os module has no FALLOC_FL_PUNCH_HOLE), and
reads and writes that retry short transfers.

Every call takes a file descriptor and blocks: run it in a worker thread.  The server's
FileBackend and ``blockdrv copy``'s local files both use them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

from ..protocol.constants import StateFlag

HOLE_FLAGS = int(StateFlag.HOLE | StateFlag.ZERO)
"""base:allocation flags of a hole."""


class FastZeroUnsupported(OSError):
    """A FAST_ZERO request that could not be done faster than writing zeroes."""

    def __init__(self) -> None:
        super().__init__(errno.ENOTSUP, "fast zero not possible here")


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Linux fallocate(2); OSError on failure."""
    if _fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def data_runs(fd: int, offset: int, length: int,
              max_runs: int | None = None) -> list[tuple[int, int, bool]]:
    """(offset, length, is_data) runs covering a range, from SEEK_DATA/SEEK_HOLE (only
    the first ``max_runs`` of them when given: a fragmented file has many)."""
    end = offset + length
    runs: list[tuple[int, int, bool]] = []
    pos = offset
    while pos < end and (max_runs is None or len(runs) < max_runs):
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole up to the end of the file
                runs.append((pos, end - pos, False))
                break
            runs.append((pos, end - pos, True))  # no SEEK_DATA here: all data
            break
        if data > pos:
            runs.append((pos, min(data, end) - pos, False))
            pos = min(data, end)
            if pos >= end:
                break
        hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
        runs.append((pos, hole - pos, True))
        pos = hole
    return runs


def pread_full(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``offset``, retrying short reads; the byte count read (less
    only at the end of the file: the file shrank under us)."""
    got = 0
    while got < len(view):
        k = os.preadv(fd, [view[got:]], offset + got)
        if k == 0:
            break
        got += k
    return got


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (pwrite may write less than asked)."""
    done = 0
    while done < len(data):
        n = os.pwrite(fd, data[done:], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, f"short write at {offset + done}")
        done += n


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a range (it reads as zeroes after), keeping the file's size."""
    fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)


def zero_range(fd: int, offset: int, length: int, *, may_trim: bool = True,
               fast: bool = False) -> None:
    """Make a range read as zeroes: punch a hole (when ``may_trim``) or zero it with
    fallocate, else write zeroes 1 MiB at a time (FastZeroUnsupported when ``fast``)."""
    modes = [_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE] if may_trim else []
    modes.append(_FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE)
    for mode in modes:
        try:
            fallocate(fd, mode, offset, length)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
    if fast:
        raise FastZeroUnsupported()
    zeroes = memoryview(bytes(min(length, 1 << 20)))
    for pos in range(0, length, len(zeroes)):
        pwrite_all(fd, zeroes[:min(len(zeroes), length - pos)], offset + pos)


