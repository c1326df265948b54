"""Questions asked in the handshake, without entering transmission: LIST and
LIST_META_CONTEXT (what ``nbdinfo --list`` and ``nbdinfo`` show)."""

from __future__ import annotations

import errno
from dataclasses import replace
from typing import Any, Sequence

import trio

from ..protocol import Goal
from ..protocol.errors import ConnectError
from ..protocol.events import ExportsListed, MetaContextsListed
from ..protocol.export import ExportEntry
from ..protocol.uri import NBDAddress, parse_uri
from ..tls import client_settings
from .handshake import HandshakeOptions, StreamFactory, connect

TIMEOUT = 30.0  # seconds a server may take to answer the whole question


async def _ask(target: str | NBDAddress, options: HandshakeOptions, goal: Goal,
               stream_factory: StreamFactory | None, tls: dict[str, Any]) -> object:
    address = parse_uri(target) if isinstance(target, str) else target
    options = replace(options, tls=client_settings(address, **tls))
    with trio.move_on_after(TIMEOUT):
        channel, event = await connect(address, options, goal=goal,
                                       stream_factory=stream_factory)
        await channel.aclose()
        return event
    raise ConnectError(f"{address} did not answer within {TIMEOUT:g}s",
                       errno=errno.ETIMEDOUT)


async def list_exports(target: str | NBDAddress, *,
                       stream_factory: StreamFactory | None = None,
                       **tls: Any) -> list[ExportEntry]:
    """The exports the server names (NBD_OPT_LIST), with their descriptions.

    ``tls``: the TLS arguments of :func:`blockdrv.tls.client_settings` (``tls``,
    ``context``, ``ca``, ``cert``, ``key``, ``hostname``).
    """
    event = await _ask(target, HandshakeOptions(), Goal.LIST, stream_factory, tls)
    assert isinstance(event, ExportsListed)
    return event.exports


async def list_meta_contexts(target: str | NBDAddress, *, export: str | None = None,
                             queries: Sequence[str] = (),
                             stream_factory: StreamFactory | None = None,
                             **tls: Any) -> list[str]:
    """Metadata contexts the export offers (NBD_OPT_LIST_META_CONTEXT).

    ``queries`` narrow the answer (e.g. ``qemu:`` for all of qemu's); none asks for
    every context the server is willing to list.  ``tls`` as for :func:`list_exports`.
    """
    address = parse_uri(target) if isinstance(target, str) else target
    if export is not None:
        address = replace(address, export=export)
    options = HandshakeOptions(export=address.export, meta_contexts=tuple(queries))
    event = await _ask(address, options, Goal.LIST_META_CONTEXT, stream_factory, tls)
    assert isinstance(event, MetaContextsListed)
    return event.contexts
