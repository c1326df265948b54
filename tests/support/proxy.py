"""A real server behind the fault proxy (blockdrv.fuzz.proxy), for one ``async with``."""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import trio

from blockdrv.fuzz.proxy import FaultProxy
from blockdrv.fuzz.servers import Peer
from blockdrv.protocol import NBDAddress, parse_uri


@asynccontextmanager
async def proxied(server: Peer, directory: Path, *, start: bool = True
                  ) -> AsyncIterator[tuple[Peer, FaultProxy, NBDAddress]]:
    """Start ``server`` (unless ``start=False``) and a FaultProxy in ``directory`` in front
    of it; yields (server, proxy, the proxy's address).  Both are stopped afterwards."""
    try:
        if start:
            server.start()
        proxy = FaultProxy(parse_uri(server.uri()), directory)
        async with trio.open_nursery() as nursery:
            address = await nursery.start(proxy.serve)
            yield server, proxy, address
            proxy.close()
    finally:
        server.stop()
