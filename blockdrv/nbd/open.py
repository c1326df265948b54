"""open_nbd: check the caller's arguments, open one device or a multi-conn one.

Every argument is checked before anything is connected, and a bad one (wrong type or
value) is an :class:`~blockdrv.InvalidArgumentError` naming the parameter, so a mistake
never surfaces later as an AttributeError deep inside.  The device's background tasks
live in a nursery owned by the context manager; no ExceptionGroup leaves it.
"""

from __future__ import annotations

import functools
import ssl
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import AsyncIterator, Sequence

import trio

from ..io.tls import TLSMode, client_settings
from ..protocol.constants import BASE_ALLOCATION
from ..protocol.errors import InvalidArgumentError
from ..protocol.uri import NBDAddress, parse_uri
from .device import NBDDevice
from .handshake import HandshakeOptions, StreamFactory
from .multiconn import MultiConnDevice, open_multi
from .settings import ConnectionSettings, check_handshake_arguments

Device = NBDDevice | MultiConnDevice
"""What :func:`open_nbd` yields: one connection, or several (``connections`` > 1)."""


def address_of(target: object, export: object = None) -> NBDAddress:
    """The parsed address of ``target`` (a URI or an NBDAddress), with ``export`` in
    place of its export name when given; InvalidArgumentError for anything else."""
    if isinstance(target, NBDAddress):
        address = target
    elif isinstance(target, str):
        address = parse_uri(target)
    else:
        raise InvalidArgumentError(f"target must be an NBD URI or an NBDAddress, "
                                   f"not {type(target).__name__}")
    if export is not None:
        if not isinstance(export, str):
            raise InvalidArgumentError(f"export must be a string, "
                                       f"not {type(export).__name__}")
        address = replace(address, export=export)
    return address


@asynccontextmanager
async def open_nbd(target: str | NBDAddress, *, export: str | None = None,
                   reconnect_delay: float = 0.0, open_timeout: float = 0.0,
                   max_in_flight: int = 16, retry_initial: float = 1.0,
                   retry_max: float = 16.0, meta_contexts: Sequence[str] = (),
                   socket_buffer_size: int | None = None, guard_writes: bool = False,
                   structured: bool = True, extended: bool = True,
                   connect_timeout: float = 30.0, cancel_timeout: float = 5.0,
                   connections: int = 1, tls: TLSMode | str | bool | None = None,
                   tls_context: ssl.SSLContext | None = None, tls_ca: str | None = None,
                   tls_cert: str | None = None, tls_key: str | None = None,
                   tls_hostname: str | None = None,
                   stream_factory: StreamFactory | None = None,
                   ) -> AsyncIterator[Device]:
    """Open an NBD export as an :class:`NBDDevice` (async context manager).

    ``target`` is an NBD URI (``nbd://host/export``, ``nbd+unix:///export?socket=PATH``)
    or a :func:`~blockdrv.parse_uri` result; ``export`` overrides the URI's export name.
    ``reconnect_delay``: how long requests wait for a reconnect after the connection is
    lost (0: fail at once while the worker keeps reconnecting in the background).
    ``open_timeout``: keep trying to connect for that long before giving up (0: one
    attempt).  ``connect_timeout``: how long one connection attempt (connect and
    handshake) may take.  ``meta_contexts``: contexts to negotiate besides
    base:allocation (e.g. ``qemu:dirty-bitmap:NAME``).  ``cancel_timeout``: how long a
    cancelled request may keep sending its request or reading its own reply before the
    connection is declared broken.  ``max_in_flight``: requests on the wire at once
    (more callers wait their turn, first come first served).  ``connections`` > 1: a
    :class:`~blockdrv.nbd.multiconn.MultiConnDevice` spreading requests over that many
    connections when the server advertises multi-conn (over one, saying why in its
    ``connections_note``, when it does not); ``max_in_flight`` is per connection.

    TLS (:mod:`blockdrv.tls`): ``tls`` is ``"off"``, ``"allow"`` (use it when the server
    offers it) or ``"require"``; ``nbds://`` URIs mean require, and asking for less on
    one is an error.  The server is verified against ``tls_ca`` (default: the system's
    CAs, or the URI's ``tls-certificates`` directory) and ``tls_hostname`` (default: the
    URI's host; ``localhost`` for Unix sockets); ``tls_cert``/``tls_key`` are a client
    certificate; ``tls_context`` replaces all of these with your own SSLContext.  Every
    reconnect redoes TLS.

    ``stream_factory`` replaces the socket connection (tests use memory streams).

    Raises:
        InvalidArgumentError: a bad argument (named in the message).
        ConnectError: no connection could be made within ``open_timeout``.
        OptionError: the server refused the export or an option that was required.
        ProtocolError: the server broke the protocol during the handshake.
        TLSError: TLS was required and could not be set up.
    """
    settings = ConnectionSettings(
        reconnect_delay=reconnect_delay, open_timeout=open_timeout,
        max_in_flight=max_in_flight, retry_initial=retry_initial, retry_max=retry_max,
        socket_buffer_size=socket_buffer_size, guard_writes=guard_writes,
        connect_timeout=connect_timeout, cancel_timeout=cancel_timeout,
        connections=connections, stream_factory=stream_factory)
    check_handshake_arguments(meta_contexts=meta_contexts, structured=structured,
                              extended=extended, tls=tls, tls_context=tls_context,
                              tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
                              tls_hostname=tls_hostname)
    _outside_asyncio("blockdrv.open_nbd")
    address = address_of(target, export)
    contexts = tuple(dict.fromkeys((BASE_ALLOCATION, *meta_contexts)))
    tls_settings = client_settings(address, tls=tls, context=tls_context, ca=tls_ca,
                                   cert=tls_cert, key=tls_key, hostname=tls_hostname)
    options = HandshakeOptions(export=address.export, structured=structured,
                               extended=extended, meta_contexts=contexts, tls=tls_settings)
    single = functools.partial(NBDDevice.opened, address, options, settings)
    if connections == 1:
        async with single() as device:
            yield device
        return
    async with open_multi(single, connections) as multi:
        yield multi


def _outside_asyncio(name: str) -> None:
    """A one-line error when a trio API is called from asyncio instead of trio."""
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        import sniffio

        try:
            library = sniffio.current_async_library()
        except sniffio.AsyncLibraryNotFoundError:
            library = "no event loop"
        raise RuntimeError(f"{name} is for trio, but this runs under {library}: use "
                           "blockdrv.aio.open_nbd from asyncio, blockdrv.sync.open_nbd "
                           "from plain threads") from None
