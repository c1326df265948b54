"""Questions asked in the handshake, without entering transmission: LIST and
LIST_META_CONTEXT (what ``nbdinfo --list`` and ``nbdinfo`` show)."""

from __future__ import annotations

import errno
import ssl
import warnings
from dataclasses import replace
from typing import Any, Sequence

import trio

from ..io.tls import TLSMode, client_settings
from ..protocol import Goal
from ..protocol.errors import ConnectError, InvalidArgumentError, NBDError
from ..protocol.events import ExportsListed, MetaContextsListed
from ..protocol.export import ExportEntry
from ..protocol.uri import NBDAddress, parse_uri
from .handshake import HandshakeOptions, StreamFactory, connect

TIMEOUT = 30.0  # seconds a server may take to answer the whole question


_OLD_TLS_NAMES = {"context": "tls_context", "ca": "tls_ca", "cert": "tls_cert",
                  "key": "tls_key", "hostname": "tls_hostname"}


def _tls_arguments(tls: TLSMode | str | bool | None, tls_context: ssl.SSLContext | None,
                   tls_ca: str | None, tls_cert: str | None, tls_key: str | None,
                   tls_hostname: str | None, old: dict[str, Any]) -> dict[str, Any]:
    """The TLS keywords of :func:`blockdrv.tls.client_settings`, from the ``tls_*``
    spelling :func:`blockdrv.open_nbd` uses (the old ``ca=``... still work, with a
    DeprecationWarning)."""
    given = {"context": tls_context, "ca": tls_ca, "cert": tls_cert, "key": tls_key,
             "hostname": tls_hostname}
    for name, value in old.items():
        if name not in _OLD_TLS_NAMES:
            raise InvalidArgumentError(f"unexpected keyword argument {name!r}")
        warnings.warn(f"{name}= is deprecated: use {_OLD_TLS_NAMES[name]}= as open_nbd "
                      "does", DeprecationWarning, stacklevel=3)
        given[name] = given[name] or value
    return {"tls": tls, **given}


async def _ask(target: str | NBDAddress, options: HandshakeOptions, goal: Goal,
               stream_factory: StreamFactory | None, tls: dict[str, Any]) -> object:
    address = parse_uri(target) if isinstance(target, str) else target
    options = replace(options, tls=client_settings(address, **tls))
    with trio.move_on_after(TIMEOUT):
        try:
            channel, event = await connect(address, options, goal=goal,
                                           stream_factory=stream_factory)
        except NBDError:
            raise
        except OSError as exc:  # no such socket, refused, unreachable...
            raise ConnectError(f"cannot connect to {address}: {exc.strerror or exc}",
                               errno=exc.errno or errno.ECONNREFUSED) from exc
        await channel.aclose()
        return event
    raise ConnectError(f"{address} did not answer within {TIMEOUT:g}s",
                       errno=errno.ETIMEDOUT)


async def list_exports(target: str | NBDAddress, *,
                       tls: TLSMode | str | bool | None = None,
                       tls_context: ssl.SSLContext | None = None, tls_ca: str | None = None,
                       tls_cert: str | None = None, tls_key: str | None = None,
                       tls_hostname: str | None = None,
                       stream_factory: StreamFactory | None = None,
                       **deprecated: Any) -> list[ExportEntry]:
    """The exports the server names (NBD_OPT_LIST), with their descriptions.

    The TLS arguments are :func:`blockdrv.open_nbd`'s (``tls``, ``tls_ca``, ...).

    Raises:
        ConnectError: no connection (no such socket, refused...) or no answer in time.
        OptionError: the server refused to list.
        ProtocolError: the server broke the protocol.
        TLSError: TLS was required and could not be set up.
    """
    tls_args = _tls_arguments(tls, tls_context, tls_ca, tls_cert, tls_key, tls_hostname,
                              deprecated)
    event = await _ask(target, HandshakeOptions(), Goal.LIST, stream_factory, tls_args)
    assert isinstance(event, ExportsListed)
    return event.exports


async def list_meta_contexts(target: str | NBDAddress, *, export: str | None = None,
                             queries: Sequence[str] = (),
                             tls: TLSMode | str | bool | None = None,
                             tls_context: ssl.SSLContext | None = None,
                             tls_ca: str | None = None, tls_cert: str | None = None,
                             tls_key: str | None = None, tls_hostname: str | None = None,
                             stream_factory: StreamFactory | None = None,
                             **deprecated: Any) -> list[str]:
    """Metadata contexts the export offers (NBD_OPT_LIST_META_CONTEXT).

    ``queries`` narrow the answer (e.g. ``qemu:`` for all of qemu's); none asks for
    every context the server is willing to list.  TLS arguments as for
    :func:`list_exports`.

    Raises: as :func:`list_exports`.
    """
    tls_args = _tls_arguments(tls, tls_context, tls_ca, tls_cert, tls_key, tls_hostname,
                              deprecated)
    address = parse_uri(target) if isinstance(target, str) else target
    if export is not None:
        address = replace(address, export=export)
    options = HandshakeOptions(export=address.export, meta_contexts=tuple(queries))
    event = await _ask(address, options, Goal.LIST_META_CONTEXT, stream_factory, tls_args)
    assert isinstance(event, MetaContextsListed)
    return event.contexts
