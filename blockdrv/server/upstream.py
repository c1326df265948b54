"""The storage of ``blockdrv serve --upstream URI``: the reconnecting driver on an
upstream NBD export, with every metadata context the upstream offers.

:func:`open_upstream` asks the upstream which metadata contexts it has
(NBD_OPT_LIST_META_CONTEXT with no query: base:allocation, qemu:dirty-bitmap:NAME,
qemu:allocation-depth, ...), then opens the export with all of them negotiated, so the
proxy can offer each to its clients.  A server that will not list them is asked for
base:allocation only.  Both steps take the same options, so with ``open_timeout`` the
proxy may start before its upstream does.  Opening failures are one line
(:func:`blockdrv.nbd.opening.open_device`).
"""

from __future__ import annotations

import functools
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from ..nbd import Device
from ..nbd.open import address_of
from ..nbd.opening import ClientOptions, ask, open_device
from ..nbd.query import list_meta_contexts
from ..protocol.constants import BASE_ALLOCATION
from ..protocol.errors import ConnectError, OptionError
from ..protocol.uri import NBDAddress


@dataclass(frozen=True)
class UpstreamOptions:
    """How the proxy opens its upstream: the client options, the connections and the
    requests in flight on each, the reconnect schedule, and TLS (the keyword arguments
    of :func:`blockdrv.tls.client_settings`: ``tls``, ``ca``, ``cert``, ``key``,
    ``hostname``)."""

    client: ClientOptions = ClientOptions(reconnect_delay=30.0)
    connections: int = 4
    max_in_flight: int = 64
    retry_initial: float = 1.0
    retry_max: float = 16.0
    tls: dict[str, Any] = field(default_factory=dict)


async def upstream_contexts(address: NBDAddress, options: UpstreamOptions) -> list[str]:
    """Every metadata context the upstream export lists (base:allocation alone when it
    refuses to list them)."""
    question = functools.partial(list_meta_contexts, address, **options.tls)
    try:
        return await ask(question, address, options.client)
    except ConnectError as exc:
        if isinstance(exc.__cause__, OptionError):
            return [BASE_ALLOCATION]
        raise


@asynccontextmanager
async def open_upstream(target: str | NBDAddress,
                        options: UpstreamOptions = UpstreamOptions()
                        ) -> AsyncIterator[Device]:
    """The upstream export as a device, every context it lists negotiated."""
    address = address_of(target)
    contexts = await upstream_contexts(address, options)
    tls = {f"tls_{name}" if name != "tls" else name: value
           for name, value in options.tls.items()}
    async with open_device(address, options.client, meta_contexts=contexts,
                           connections=options.connections,
                           max_in_flight=options.max_in_flight,
                           retry_initial=options.retry_initial,
                           retry_max=options.retry_max, **tls) as device:
        yield device
