"""Connect to an NBD server and run the handshake over a trio stream.

:func:`connect` opens the byte stream (or calls a test's stream factory), wraps it in a
:class:`~blockdrv.transport.Channel` and drives a
:class:`~blockdrv.protocol.ClientNegotiator` to its final event.  Whatever goes wrong,
the stream is closed before the error leaves, and the error says where it happened:
the address for connection failures, the phase for a server that hangs up mid-handshake.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

import trio

from ..io.tls import NO_TLS, TLSSettings, upgrade
from ..io.transport import Channel, TransportError, open_stream
from ..protocol import (
    NEED_DATA,
    ClientNegotiator,
    ExportInfo,
    Goal,
    NBDError,
    ProtocolError,
    StartTLS,
)
from ..protocol.errors import ConnectionLostError, TLSError
from ..protocol.negotiate import Phase
from ..protocol.uri import NBDAddress

StreamFactory = Callable[[], Awaitable[trio.abc.Stream]]


@dataclass(frozen=True)
class HandshakeOptions:
    """What the client asks for in every handshake of a device."""

    export: str = ""
    structured: bool = True
    extended: bool = True
    meta_contexts: Sequence[str] = ()
    tls: TLSSettings = NO_TLS


async def negotiate(channel: Channel, negotiator: ClientNegotiator,
                    tls: TLSSettings = NO_TLS) -> object:
    """Drive ``negotiator`` over ``channel``; returns its final event.

    Every read that did not have to wait is followed by a checkpoint, so a server that
    floods the handshake cannot hold up deadlines or the program's other tasks.
    Bytes that arrived after the handshake are put back into the channel.  After an
    acknowledged STARTTLS the channel is upgraded (:func:`blockdrv.tls.upgrade`) and the
    negotiation goes on inside TLS.  On an NBDError the soft-disconnect bytes
    (NBD_OPT_ABORT) are sent, best effort (never in plaintext once TLS was started).
    """
    # With TLS 1.3 a server that refuses our client certificate says so only by closing
    # the connection after the handshake: a hang-up at the first read inside TLS.
    first_read_in_tls = False
    try:
        while True:
            event = negotiator.next_event()
            out = negotiator.data_to_send()
            if out:
                await channel.send(out)
            if event is NEED_DATA:
                waits = channel.waits
                negotiator.receive_data(await channel.receive_some())
                if channel.waits == waits:  # the data was there: give others a turn
                    await trio.lowlevel.checkpoint()
                first_read_in_tls = False
            elif isinstance(event, StartTLS):
                await upgrade(channel, tls)
                negotiator.tls_started()
                first_read_in_tls = True
            else:
                channel.unread(negotiator.leftover())
                return event
    except NBDError as exc:
        goodbye = negotiator.data_to_send() or negotiator.abort()
        # No goodbye on a stream that cannot be trusted (a protocol violation) or is
        # between STARTTLS and TLS (it would go out in plaintext).
        if goodbye and not isinstance(exc, ProtocolError) \
                and negotiator.phase is not Phase.TLS_UPGRADE:
            with trio.move_on_after(1):
                try:
                    await channel.send(goodbye)
                except TransportError:
                    pass
        raise
    except TransportError as exc:
        if first_read_in_tls:
            raise TLSError(f"server closed the TLS connection during the handshake "
                           f"({negotiator.phase.value} phase; does it require a client "
                           f"certificate?): {exc}") from exc
        raise ConnectionLostError(f"server closed the connection during the handshake "
                                  f"({negotiator.phase.value} phase): {exc}") from exc


async def connect(address: NBDAddress, options: HandshakeOptions, *,
                  goal: Goal = Goal.GO, stream_factory: StreamFactory | None = None,
                  socket_buffer_size: int | None = None) -> tuple[Channel, object]:
    """Open a connection and negotiate; returns the channel and the final event.

    Raises OSError (connect failed: the message names the address), ConnectionLostError
    (the server hung up during the handshake), OptionError or ProtocolError.
    """
    if stream_factory is not None:
        stream = await stream_factory()
    else:
        stream = await open_stream(address, socket_buffer_size=socket_buffer_size)
    channel = Channel(stream)
    negotiator = ClientNegotiator(options.export, goal=goal, tls=options.tls.mode,
                                  structured=options.structured, extended=options.extended,
                                  meta_contexts=options.meta_contexts)
    try:
        event = await negotiate(channel, negotiator, options.tls)
    except BaseException:
        await channel.aclose()
        raise
    return channel, event


async def connect_export(address: NBDAddress, options: HandshakeOptions, *,
                         stream_factory: StreamFactory | None = None,
                         socket_buffer_size: int | None = None) -> tuple[Channel, ExportInfo]:
    """:func:`connect` for transmission: returns the channel and the export's info."""
    channel, event = await connect(address, options, stream_factory=stream_factory,
                                   socket_buffer_size=socket_buffer_size)
    return channel, event.info  # type: ignore[attr-defined]
