"""Storage and replies for the embedded server's protocol-level tests (the server itself
runs with :func:`support.inprocess.serving`)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from blockdrv.protocol import ReadData, ReadHole
from blockdrv.server import Backend, FileBackend, MemoryBackend
from blockdrv.util.units import MiB
from support.client import AsyncClient

STORE_KINDS = ["memory", "file"]


@contextmanager
def open_store(kind: str, directory: Path) -> Iterator[Backend]:
    """An 8 MiB backend of a kind in STORE_KINDS, closed afterwards."""
    backend: Backend
    if kind == "file":
        backend = FileBackend(directory / "x.img", size=8 * MiB, create=True)
    else:
        backend = MemoryBackend(8 * MiB)
    try:
        yield backend
    finally:
        backend.close()


async def read_reply(client: AsyncClient, cookie: int, offset: int, count: int) -> bytes:
    """The data of a READ reply (request ``count`` bytes at ``offset``) sent earlier."""
    buf = bytearray(count)
    events = await client.wait(cookie)
    if events[-1].error is not None:
        raise events[-1].error
    for event in events:
        if isinstance(event, ReadData):
            buf[event.offset - offset:event.offset - offset + len(event.data)] = event.data
        elif isinstance(event, ReadHole):
            buf[event.offset - offset:event.offset - offset + event.length] = bytes(
                event.length)
    return bytes(buf)
