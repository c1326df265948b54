"""TLS for NBD: building SSL contexts and upgrading a connection after STARTTLS.

Theory of operation
-------------------
NBD does TLS in-band: the client sends NBD_OPT_STARTTLS in the option haggling, the
server acknowledges, and both sides run a TLS handshake on the same byte stream; the
negotiation then starts over inside TLS (structured replies, extended headers and meta
contexts are asked for again).  The sans-IO negotiators of :mod:`blockdrv.protocol`
decide *when* (they return a ``StartTLS`` event and wait for ``tls_started()``); this
module does the I/O part: :func:`upgrade` wraps the connection's stream in a
``trio.SSLStream``, runs the handshake and hands the channel the encrypted stream.

The spec's downgrade rules are where NBD clients have had CVEs (a client told to
require TLS that went on in plaintext), so, with ``TLSMode.REQUIRE``, every way TLS can
fail ends the connection with :class:`TLSError`: a refused STARTTLS (the negotiator
raises), a failed handshake (bad certificate, wrong host name, a peer that does not
speak TLS), and plaintext bytes that arrived after the acknowledgement (a ProtocolError:
they would otherwise be read as if they had come through TLS).  The client verifies the server's
certificate and host name by default.

Host name: ``tls_hostname`` if given, else the URI's ``tls-hostname`` parameter, else
the TCP host, else (Unix sockets) ``localhost``.  A URI's ``tls-certificates=DIR``
names a directory laid out as libnbd and qemu expect: ``ca-cert.pem`` and optionally
``client-cert.pem`` + ``client-key.pem`` (``server-cert.pem`` + ``server-key.pem`` for a
server).
"""

from __future__ import annotations

import errno
import os
import ssl
from dataclasses import dataclass

import trio

from ..protocol.errors import InvalidArgumentError, ProtocolError, TLSError
from ..protocol.negotiate import TLSMode
from ..protocol.uri import NBDAddress
from .transport import Channel

__all__ = ["NO_TLS", "TLSError", "TLSMode", "TLSSettings", "client_context", "client_settings",
           "server_context", "upgrade"]


@dataclass(frozen=True)
class TLSSettings:
    """How one side of a connection does TLS: the mode, the context, the peer's name."""

    mode: TLSMode = TLSMode.OFF
    context: ssl.SSLContext | None = None
    hostname: str | None = None  # the name the server's certificate must carry


NO_TLS = TLSSettings()
"""Plaintext: the default."""


def _mode(value: TLSMode | str | bool | None) -> TLSMode | None:
    if value is None or isinstance(value, TLSMode):
        return value
    if isinstance(value, bool):
        return TLSMode.REQUIRE if value else TLSMode.OFF
    try:
        return TLSMode(value.lower())
    except ValueError:
        raise InvalidArgumentError(f"tls must be off, allow or require, not {value!r}") \
            from None


def _load(what: str, load: object, *args: str) -> None:
    try:
        load(*args)  # type: ignore[operator]
    except ssl.SSLError as exc:  # its errno is OpenSSL's, not an OS one
        raise TLSError(f"cannot load the {what} from {' and '.join(args)}: {exc}",
                       errno=errno.EINVAL) from exc
    except OSError as exc:
        raise TLSError(f"cannot load the {what} from {' and '.join(args)}: "
                       f"{exc.strerror or exc}", errno=exc.errno or errno.EINVAL) from exc


def client_context(*, ca: str | None = None, cert: str | None = None,
                   key: str | None = None, verify: bool = True) -> ssl.SSLContext:
    """An SSL context for the client: trusts ``ca`` (default: the system's CAs),
    presents ``cert``/``key`` when given, verifies the peer unless ``verify=False``."""
    if ca is not None:  # trust this CA only, as libnbd and qemu do (not the system's too)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        _load("CA certificates", context.load_verify_locations, ca)
    else:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if cert is not None:
        _load("client certificate", context.load_cert_chain, cert, *([key] if key else []))
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def server_context(*, cert: str, key: str | None = None,
                   ca: str | None = None) -> ssl.SSLContext:
    """An SSL context for the server; with ``ca``, clients must present a certificate
    signed by it."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _load("server certificate", context.load_cert_chain, cert, *([key] if key else []))
    if ca is not None:
        _load("CA certificates", context.load_verify_locations, ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_settings(address: NBDAddress, *, tls: TLSMode | str | bool | None = None,
                    context: ssl.SSLContext | None = None, ca: str | None = None,
                    cert: str | None = None, key: str | None = None,
                    hostname: str | None = None) -> TLSSettings:
    """What :func:`blockdrv.open_nbd`'s TLS arguments and the URI ask for, checked.

    ``nbds://`` and ``nbds+unix://`` mean REQUIRE; asking for less on such a URI is an
    error rather than a silent downgrade.
    """
    mode = _mode(tls)
    if address.tls:
        if mode not in (None, TLSMode.REQUIRE):
            raise InvalidArgumentError(f"{address} requires TLS; tls={mode.value!r} would "
                                       "downgrade it")
        mode = TLSMode.REQUIRE
    mode = mode or TLSMode.OFF
    if mode is TLSMode.OFF:
        return NO_TLS
    if context is None:
        directory = address.tls_certificates
        if directory is not None and ca is None:
            ca = os.path.join(directory, "ca-cert.pem")
            if cert is None and os.path.exists(os.path.join(directory, "client-cert.pem")):
                cert = os.path.join(directory, "client-cert.pem")
                key = key or os.path.join(directory, "client-key.pem")
        context = client_context(ca=ca, cert=cert, key=key,
                                 verify=address.tls_verify_peer)
    elif any((ca, cert, key)):
        raise InvalidArgumentError("give an SSLContext or CA/certificate/key paths, not both")
    name = hostname or address.tls_hostname or (
        address.host if address.transport == "tcp" else "localhost")
    return TLSSettings(mode, context, name)


async def upgrade(channel: Channel, settings: TLSSettings, *, server_side: bool = False
                  ) -> None:
    """Run the TLS handshake on ``channel`` after STARTTLS was acknowledged.

    Plaintext bytes already read past the acknowledgement are a ProtocolError; a failed
    handshake is a TLSError naming the reason (certificate, host name, not TLS).
    """
    if settings.context is None:
        raise TLSError("STARTTLS was acknowledged but no TLS context is configured")
    leftover = channel.take_buffered()
    if leftover:
        raise ProtocolError(f"{len(leftover)} plaintext bytes arrived after STARTTLS was "
                            "acknowledged; refusing to trust them")
    stream = trio.SSLStream(channel.stream, settings.context, server_side=server_side,
                            server_hostname=None if server_side else settings.hostname)
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, ssl.SSLCertVerificationError):
            reason = f"certificate verify failed: {cause.verify_message}"
        else:
            reason = getattr(cause, "reason", None) or str(cause) \
                or "the peer closed the connection"
        peer = "client" if server_side else f"server ({settings.hostname})"
        raise TLSError(f"TLS handshake with the {peer} failed: {reason}") from exc
    channel.replace_stream(stream)
